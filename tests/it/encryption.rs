//! Encrypted repositories (issue 14; docs/SECURITY.md, docs/FORMAT.md §F3), through the CLI:
//!
//! - no plaintext: a real ext4 volume holding marker strings (plain, repeated, compressible),
//!   marked file names, the hostname and the source path; none of them is in any repository
//!   file or name, blob ids are not the unkeyed hashes of the blocks, and the hand-written
//!   decrypting reader of util.rs finds and decrypts the volume;
//! - tampering: one bit flipped in each kind of object, packs swapped, a snapshot replaced by
//!   another's file or by one from another repository, `config` edited, key slots truncated or
//!   hostile: restore and verify exit 1 naming the object, nothing panics;
//! - passwords: every source and their precedence, wrong, empty and missing passwords (never a
//!   hang, even with an open stdin), `key add | list | remove | passwd` keeping every snapshot
//!   readable, the last and the current slot not removable;
//! - crashes (abort) at each point of `key add` and `key passwd` never leave a repository that
//!   no password opens;
//! - plain repositories (format 2 with `--no-encryption`, format 1) still work without a
//!   password and refuse one.

use crate::util::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Safety limit for one command (a hang fails the test; nothing here is a speed check).
const LIMIT: u64 = 300;

/// `volback ARGS` exactly as given, with password `pw` in `VOLBACK_PASSWORD`.
fn vb(args: &[&str], pw: &str) -> Run {
    volback_raw(args, &[("VOLBACK_PASSWORD", pw)], LIMIT)
}

fn vb_ok(args: &[&str], pw: &str) -> Run {
    vb(args, pw).expect_code(0)
}

/// `init REPO` encrypted with password `pw` (cheap Argon2id parameters).
fn init_with(repo: &Path, pw: &str, extra: &[&str]) {
    let mut args = vec!["init", p(repo)];
    args.extend_from_slice(&CHEAP_KDF);
    args.extend_from_slice(extra);
    vb_ok(&args, pw);
}

/// Snapshot ids of `repo`, opened with `pw`.
fn ids_with(repo: &Path, pw: &str) -> Vec<String> {
    let v = vb_ok(&["snapshots", "--json", p(repo)], pw).json();
    v.as_array()
        .expect("snapshots --json prints an array")
        .iter()
        .map(|s| jstr(s, "/id").to_string())
        .collect()
}

/// SHA-256 of snapshot `id` of `repo` restored with `pw` into `dir`.
fn restored_sha(repo: &Path, id: &str, pw: &str, dir: &Path) -> String {
    let out = dir.join(format!("restored-{}.img", &id[..12]));
    let _ = std::fs::remove_file(&out);
    vb_ok(&["restore", p(repo), id, p(&out)], pw);
    let sha = sha256_file(&out);
    std::fs::remove_file(&out).expect("remove restored image");
    sha
}

/// `cp -a FROM TO`.
fn copy_dir(from: &Path, to: &Path) {
    run_ok("cp", &["-a", p(from), p(to)]);
}

/// A source of `size` bytes, half random, half text, from `seed`.
fn mixed_source(path: &Path, size: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut v = Vec::with_capacity(size);
    while v.len() < size {
        let n = (size - v.len()).min(256 * KIB as usize);
        if rng.below(2) == 0 {
            v.extend_from_slice(&rng.bytes(n));
        } else {
            v.extend_from_slice(&rng.text(n));
        }
    }
    std::fs::write(path, v).expect("write source");
}

/// Every file under `dir` (recursively), sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("list directory").flatten() {
            let path = e.path();
            let ft = e.file_type().expect("file type");
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_file() {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Which `needles` appear in a file's content or in its path relative to `repo`:
/// (relative path, needle) pairs.
fn needles_in_repo(repo: &Path, needles: &[String]) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for f in files_under(repo) {
        let rel = f.strip_prefix(repo).unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(&f).unwrap_or_else(|e| panic!("read {}: {e}", f.display()));
        for n in needles {
            if rel.contains(n.as_str()) || contains(&bytes, n.as_bytes()) {
                found.push((rel.clone(), n.clone()));
            }
        }
    }
    found
}

/// Asserts that `r` exited 1 (no panic) and that its output names one of `names` (errors go
/// to stderr; `verify` reports the problems it finds on stdout).
fn fails_naming(r: Run, names: &[&str], case: &str) -> Run {
    let r = r.expect_code(1);
    let all = r.all_output();
    assert!(
        names.iter().any(|n| all.contains(n)),
        "{case}: the error does not name the object ({names:?}):\n{all}"
    );
    r
}

fn flip_bit(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    b[at] ^= 0x01;
    std::fs::write(path, b).unwrap();
}

fn file_name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

// ---------------------------------------------------------------------------------------------

/// `init` encrypts by default: `config` version 3 with its `encryption` object and a sealed
/// copy that opens (by hand) to the same fields, one key slot with the Argon2id parameters
/// asked for; `--no-encryption` makes an unchanged format-2 repository.
#[test]
fn init_encrypts_by_default_with_the_documented_config_and_key_slot() {
    let t = TestDir::new();
    let repo = t.join("repo");
    init_repo(&repo, &[]);
    let c = repo_config(&repo);
    assert_eq!(c["version"], 3, "{c}");
    assert_eq!(c["encryption"]["version"], 1, "{c}");
    assert_eq!(c["encryption"]["aead"], "aes-256-gcm", "{c}");
    assert_eq!(c["encryption"]["kdf"], "argon2id", "{c}");
    let slots = key_slots(&repo);
    assert_eq!(slots.len(), 1, "{slots:?}");
    assert!(
        slots[0].len() == 16 && slots[0].bytes().all(|b| b.is_ascii_hexdigit()),
        "slot id {}",
        slots[0]
    );
    let slot: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo.join("keys").join(&slots[0])).unwrap()).unwrap();
    assert_eq!(slot["memory_kib"], 1024, "{slot}");
    assert_eq!(slot["iterations"], 1, "{slot}");
    assert_eq!(slot["kdf"], "argon2id", "{slot}");

    // The sealed copy of the config opens by hand and says the same as the plain fields.
    let keys = repo_keys(&repo).expect("an encrypted repository");
    assert_eq!(keys.slot, slots[0]);
    assert_ne!(keys.chunker_seed, 0);
    let sealed = hex::decode(jstr(&c, "/sealed")).expect("sealed is hex");
    let inner: serde_json::Value =
        serde_json::from_slice(&keys.open_or_panic(kind::CONFIG, "", &sealed, "sealed config"))
            .expect("the sealed config is JSON");
    let strip = |v: &serde_json::Value| {
        let mut o = v.as_object().expect("config is an object").clone();
        o.remove("sealed");
        o
    };
    assert_eq!(strip(&inner), strip(&c), "sealed copy of the config");

    let plain = t.join("plain");
    init_repo(&plain, &["--no-encryption"]);
    let c = repo_config(&plain);
    assert_eq!(c["version"], 2, "{c}");
    assert!(
        c.get("encryption").is_none() && c.get("sealed").is_none(),
        "{c}"
    );
    assert!(
        !plain.join("keys").exists(),
        "a plain repository has no keys/"
    );
}

/// Acceptance "no plaintext", on a real ext4 volume made with mkfs.ext4 and filled through a
/// loop mount.
#[test]
fn no_plaintext_in_an_encrypted_repository_and_the_data_decrypts_by_hand() {
    if !require_root_and_loop() {
        return;
    }
    let t = TestDir::new();
    let mut rng = Rng::new(1400);
    let tag = |rng: &mut Rng, what: &str| format!("VB{what}{:016x}", rng.next_u64());
    let mark_plain = tag(&mut rng, "PLAIN");
    let mark_repeat = tag(&mut rng, "REPEAT");
    let mark_text = tag(&mut rng, "TEXT");
    let mark_incr = tag(&mut rng, "INCR");
    let fname = tag(&mut rng, "FNAME");
    let dname = tag(&mut rng, "DNAME");
    let srcdir = t.join(&tag(&mut rng, "SRCPATH"));
    std::fs::create_dir(&srcdir).unwrap();
    let img = srcdir.join("volume.img");
    sparse_file(&img, 64 * MIB);

    // The volume: a marker once per block in incompressible data (stored raw in a plain
    // repository), a marker repeated (compressible), markers in text, marked file and
    // directory names.
    let fill = |mark_incr: Option<&str>| {
        let lo = Loop::attach(&img, false);
        if mark_incr.is_none() {
            crate::ext4::mkfs_ext4(&lo.dev);
        }
        let m = Mount::new(lo.path(), &t.join("mnt"), None);
        let mut rng = Rng::new(1401);
        if let Some(incr) = mark_incr {
            std::fs::write(m.dir.join("later.txt"), incr.repeat(1000)).unwrap();
        } else {
            let mut plain = rng.bytes(MIB as usize);
            for k in 0..16 {
                let at = k * 4096 + 100;
                plain[at..at + mark_plain.len()].copy_from_slice(mark_plain.as_bytes());
            }
            std::fs::write(m.dir.join("plain.bin"), plain).unwrap();
            std::fs::write(
                m.dir.join("repeated.txt"),
                mark_repeat.repeat(2 * MIB as usize / mark_repeat.len()),
            )
            .unwrap();
            let mut text = Vec::new();
            while text.len() < 3 * MIB as usize {
                text.extend_from_slice(&rng.text(10_000));
                text.extend_from_slice(mark_text.as_bytes());
            }
            std::fs::write(m.dir.join("notes.txt"), text).unwrap();
            std::fs::create_dir(m.dir.join(&dname)).unwrap();
            std::fs::write(m.dir.join(&dname).join(&fname), b"small file\n").unwrap();
        }
        m.unmount();
        drop(lo);
    };
    fill(None);

    let enc = t.join("enc");
    let plain = t.join("plain");
    init_repo(&enc, &[]);
    init_repo(&plain, &["--no-encryption"]);
    for repo in [&enc, &plain] {
        backup_json(&img, repo, &[]);
    }
    fill(Some(&mark_incr));
    for repo in [&enc, &plain] {
        backup_json(&img, repo, &[]);
        volback_ok(&["verify", "--read-data", p(repo)]);
    }

    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("read the hostname")
        .trim()
        .to_string();
    let mut needles = vec![
        mark_plain.clone(),
        mark_repeat.clone(),
        mark_text.clone(),
        mark_incr.clone(),
        fname.clone(),
        dname.clone(),
        file_name(&srcdir),
        p(&img).to_string(),
    ];
    // As the snapshot header holds it (compact JSON); the bare name too, unless it is so
    // short that it could turn up by chance in megabytes of ciphertext.
    let host_json = format!("\"hostname\":\"{hostname}\"");
    needles.push(host_json.clone());
    if hostname.len() >= 6 {
        needles.push(hostname.clone());
    } else {
        eprintln!("hostname {hostname:?} too short to search for");
    }

    // The control: the same scan finds them in the plain repository (so it can find them).
    let in_plain = needles_in_repo(&plain, &needles);
    for n in [&mark_plain, &p(&img).to_string(), &host_json] {
        assert!(
            in_plain.iter().any(|(_, m)| m == n),
            "the scan does not find {n} in the plain repository: {in_plain:?}"
        );
    }
    let in_enc = needles_in_repo(&enc, &needles);
    assert!(
        in_enc.is_empty(),
        "plaintext in the encrypted repository: {in_enc:?}"
    );

    // The hand-written reader decrypts everything: the volume rebuilt from the sealed tree
    // and frames is the restore, and it holds the markers.
    let ids = snapshot_ids(&enc);
    assert_eq!(ids.len(), 2);
    for (i, id) in ids.iter().enumerate() {
        let by_hand = volume_by_hand(&enc, id);
        let restored = t.join("restored.img");
        let _ = std::fs::remove_file(&restored);
        restore(&enc, id, &restored);
        assert_eq!(
            sha256_bytes(&by_hand),
            sha256_file(&restored),
            "snapshot {id} decrypted by hand differs from its restore"
        );
        let want: Vec<&String> = if i == 0 {
            vec![&mark_plain, &mark_repeat, &mark_text, &fname, &dname]
        } else {
            vec![&mark_plain, &mark_incr, &fname]
        };
        for m in want {
            assert!(
                contains(&by_hand, m.as_bytes()),
                "{m} not found in snapshot {id} decrypted by hand"
            );
        }
        let h = snapshot_header(&enc, id);
        assert_eq!(jstr(&h, "/hostname"), hostname, "hostname in the header");
        assert!(
            jstr(&h, "/source/path").ends_with("volume.img"),
            "source path in the header: {h}"
        );
    }

    // Keyed ids: no blob id and no file name is an unkeyed BLAKE3 of a block of the volume or
    // of the blob's own content, and no blob id is shared with the plain repository.
    let volume = std::fs::read(&img).unwrap();
    let mut unkeyed: BTreeSet<String> = volume.chunks(4096).map(blake3_hex).collect();
    let idx = read_index(&enc);
    assert!(!idx.blobs.is_empty());
    for id in idx.blobs.keys() {
        let content = read_blob(&enc, &idx, id);
        let h = blake3_hex(&content);
        assert_ne!(
            &h, id,
            "blob {id} is named by the unkeyed hash of its content"
        );
        unkeyed.insert(h);
    }
    for id in idx.blobs.keys() {
        assert!(!unkeyed.contains(id), "blob id {id} is an unkeyed hash");
    }
    for f in files_under(&enc) {
        let n = file_name(&f);
        assert!(!unkeyed.contains(&n), "{} is an unkeyed hash", f.display());
    }
    let plain_ids: BTreeSet<String> = read_index(&plain).blobs.keys().cloned().collect();
    let shared: Vec<&String> = idx
        .blobs
        .keys()
        .filter(|id| plain_ids.contains(*id))
        .collect();
    assert!(
        shared.is_empty(),
        "ids shared with a plain repository: {shared:?}"
    );
}

/// Acceptance "tampering": every kind of object damaged, one case per copy of the repository.
#[test]
fn tampering_with_any_object_fails_restore_and_verify_naming_it() {
    let t = TestDir::new();
    let pristine = t.join("pristine");
    init_repo(&pristine, &["--pack-size", "1M"]);
    let src = t.join("src.img");
    mixed_source(&src, 12 * MIB as usize, 1410);
    backup_json(&src, &pristine, &[]);
    let mut rng = Rng::new(1411);
    write_at(&src, 3 * MIB, &rng.bytes(2 * MIB as usize));
    backup_json(&src, &pristine, &[]);
    let ids = snapshot_ids(&pristine);
    assert_eq!(ids.len(), 2);
    let (s1, s2) = (ids[0].clone(), ids[1].clone());
    let sha1 = restored_sha(&pristine, &s1, TEST_PASSWORD, t.path());
    assert!(pack_files(&pristine).len() >= 4, "several packs");

    let mut n = 0;
    let mut case = |name: &str| -> PathBuf {
        n += 1;
        let dir = t.join(&format!("case{n}-{name}"));
        copy_dir(&pristine, &dir);
        dir
    };
    let restore_s = |repo: &Path, id: &str| -> Run {
        let out = t.join("out.img");
        let _ = std::fs::remove_file(&out);
        let r = volback(&["restore", p(repo), id, p(&out)]);
        let _ = std::fs::remove_file(&out);
        r
    };
    let verify = |repo: &Path| volback(&["verify", "--read-data", p(repo)]);

    // A bit of a data frame of snapshot 1.
    let repo = case("data-frame");
    let loc = locate_block(&repo, &s1, 5);
    flip_bit(
        &loc.pack_path,
        (loc.entry.frame_offset + loc.entry.frame_len / 2) as usize,
    );
    fails_naming(restore_s(&repo, &s1), &[&loc.pack], "data frame: restore");
    fails_naming(verify(&repo), &[&loc.pack], "data frame: verify");

    // A bit of the frame holding snapshot 1's root tree node.
    let repo = case("tree-frame");
    let root = block_map(&repo, &s1).tree_blobs[0].clone();
    let idx = read_index(&repo);
    let (pack, e) = idx.locations(&root)[0].clone();
    flip_bit(
        &pack_path(&repo, &pack),
        (e.frame_offset + e.frame_len / 2) as usize,
    );
    fails_naming(restore_s(&repo, &s1), &[&pack], "tree frame: restore");
    fails_naming(verify(&repo), &[&pack], "tree frame: verify");

    // A bit of a pack's sealed blob table. The restore does not need the table: it may
    // succeed, but then with the right data; verify must find it.
    let repo = case("pack-table");
    let loc = locate_block(&repo, &s1, 5);
    let b = std::fs::read(&loc.pack_path).unwrap();
    let table = u64::from_le_bytes(b[b.len() - 56..b.len() - 48].try_into().unwrap()) as usize;
    flip_bit(&loc.pack_path, table + 30);
    let r = restore_s(&repo, &s1);
    if r.code != Some(0) {
        fails_naming(r, &[&loc.pack], "pack table: restore");
    } else {
        assert_eq!(restored_sha(&repo, &s1, TEST_PASSWORD, t.path()), sha1);
    }
    fails_naming(verify(&repo), &[&loc.pack], "pack table: verify");

    // A pack one byte short (its trailer cut: like the table, the restore does not need it).
    let repo = case("pack-truncated");
    let loc = locate_block(&repo, &s1, 5);
    let len = std::fs::metadata(&loc.pack_path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&loc.pack_path)
        .unwrap()
        .set_len(len - 1)
        .unwrap();
    let r = restore_s(&repo, &s1);
    if r.code != Some(0) {
        fails_naming(r, &[&loc.pack], "truncated pack: restore");
    } else {
        assert_eq!(restored_sha(&repo, &s1, TEST_PASSWORD, t.path()), sha1);
    }
    fails_naming(verify(&repo), &[&loc.pack], "truncated pack: verify");

    // Two packs swapped (each under the other's name).
    let repo = case("packs-swapped");
    let a = locate_block(&repo, &s1, 5);
    let other: Vec<PathBuf> = pack_files(&repo)
        .into_iter()
        .filter(|f| *f != a.pack_path)
        .collect();
    let bpath = other[0].clone();
    let tmp = t.join("swap.tmp");
    std::fs::rename(&a.pack_path, &tmp).unwrap();
    std::fs::rename(&bpath, &a.pack_path).unwrap();
    std::fs::rename(&tmp, &bpath).unwrap();
    let bname = file_name(&bpath);
    fails_naming(
        restore_s(&repo, &s1),
        &[&a.pack, &bname],
        "swapped packs: restore",
    );
    fails_naming(verify(&repo), &[&a.pack, &bname], "swapped packs: verify");

    // A bit of an index file.
    let repo = case("index");
    let index = index_files(&repo)[0].clone();
    let len = std::fs::metadata(&index).unwrap().len() as usize;
    flip_bit(&index, len / 2);
    let iname = file_name(&index);
    fails_naming(restore_s(&repo, &s1), &[&iname], "index file: restore");
    fails_naming(verify(&repo), &[&iname], "index file: verify");

    // A bit of a snapshot file.
    let repo = case("snapshot");
    let f = repo.join("snapshots").join(&s1);
    let len = std::fs::metadata(&f).unwrap().len() as usize;
    flip_bit(&f, len / 2);
    fails_naming(restore_s(&repo, &s1), &[&s1], "snapshot file: restore");
    fails_naming(verify(&repo), &[&s1], "snapshot file: verify");

    // Snapshot 1 replaced by snapshot 2's file.
    let repo = case("snapshot-replaced");
    std::fs::copy(
        repo.join("snapshots").join(&s2),
        repo.join("snapshots").join(&s1),
    )
    .unwrap();
    fails_naming(
        restore_s(&repo, &s1),
        &[&s1],
        "snapshot replaced by another: restore",
    );
    fails_naming(
        verify(&repo),
        &[&s1],
        "snapshot replaced by another: verify",
    );

    // A snapshot of another repository (same password), under its own name.
    let repo = case("foreign-snapshot");
    let foreign = t.join("foreign");
    init_repo(&foreign, &[]);
    backup_json(&src, &foreign, &[]);
    let fid = snapshot_ids(&foreign)[0].clone();
    std::fs::copy(
        foreign.join("snapshots").join(&fid),
        repo.join("snapshots").join(&fid),
    )
    .unwrap();
    fails_naming(
        restore_s(&repo, &fid),
        &[&fid],
        "snapshot of another repository: restore",
    );
    fails_naming(
        verify(&repo),
        &[&fid],
        "snapshot of another repository: verify",
    );

    // A plain field of config edited; a bit of its sealed copy flipped.
    let repo = case("config-field");
    let mut c = repo_config(&repo);
    c["zstd_level"] = serde_json::json!(c["zstd_level"].as_i64().unwrap_or(3) + 1);
    std::fs::write(repo.join("config"), serde_json::to_vec(&c).unwrap()).unwrap();
    fails_naming(restore_s(&repo, &s1), &["config"], "config field: restore");
    fails_naming(verify(&repo), &["config"], "config field: verify");
    let repo = case("config-sealed");
    let mut c = repo_config(&repo);
    let mut sealed = jstr(&c, "/sealed").to_string();
    let mid = sealed.len() / 2;
    let d = if &sealed[mid..mid + 1] == "0" {
        "1"
    } else {
        "0"
    };
    sealed.replace_range(mid..mid + 1, d);
    c["sealed"] = serde_json::json!(sealed);
    std::fs::write(repo.join("config"), serde_json::to_vec(&c).unwrap()).unwrap();
    fails_naming(restore_s(&repo, &s1), &["config"], "sealed config: restore");
    fails_naming(verify(&repo), &["config"], "sealed config: verify");

    // The key slot truncated; its wrapped key changed; hostile Argon2id parameters.
    let slot = key_slots(&pristine)[0].clone();
    let repo = case("slot-truncated");
    let f = repo.join("keys").join(&slot);
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    fails_naming(
        restore_s(&repo, &s1),
        &[&slot],
        "truncated key slot: restore",
    );
    fails_naming(verify(&repo), &[&slot], "truncated key slot: verify");
    for (name, field, value) in [
        ("slot-memory", "memory_kib", serde_json::json!(u32::MAX)),
        ("slot-iterations", "iterations", serde_json::json!(0)),
        ("slot-lanes", "parallelism", serde_json::json!(1000)),
    ] {
        let repo = case(name);
        let f = repo.join("keys").join(&slot);
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
        v[field] = value;
        std::fs::write(&f, serde_json::to_vec(&v).unwrap()).unwrap();
        fails_naming(restore_s(&repo, &s1), &[&slot], name);
    }
    let repo = case("slot-wrapped");
    let f = repo.join("keys").join(&slot);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
    let mut w = jstr(&v, "/wrapped").to_string();
    let d = if &w[40..41] == "0" { "1" } else { "0" };
    w.replace_range(40..41, d);
    v["wrapped"] = serde_json::json!(w);
    std::fs::write(&f, serde_json::to_vec(&v).unwrap()).unwrap();
    fails_naming(
        restore_s(&repo, &s1),
        &[&slot, "password"],
        "changed wrapped key: restore",
    );

    // The pristine repository was never touched.
    volback_ok(&["verify", "--read-data", p(&pristine)]);
    assert_eq!(restored_sha(&pristine, &s1, TEST_PASSWORD, t.path()), sha1);
}

/// Every way of giving a password, their precedence, and the clear errors: wrong, empty,
/// missing (stdin /dev/null, or an open pipe: never a hang), and a password for a plain
/// repository.
#[test]
fn passwords_from_every_source_and_clear_errors() {
    let t = TestDir::new();
    let repo = t.join("repo");
    let r = p(&repo);
    let pwfile = t.join("pw");
    std::fs::write(&pwfile, "first password\r\nsecond line\n").unwrap();
    let mut args = vec!["init", r, "--password-file", p(&pwfile)];
    args.extend_from_slice(&CHEAP_KDF);
    volback_raw(&args, &[], LIMIT).expect_code(0);
    let src = t.join("src.img");
    mixed_source(&src, 4 * MIB as usize, 1420);
    // The first line of the file, without its \r\n, is the password.
    vb_ok(&["backup", p(&src), r], "first password");
    let ok = |args: &[&str], env: &[(&str, &str)]| {
        volback_raw(args, env, LIMIT).expect_code(0);
    };
    let wrong = "not the password";
    ok(
        &["snapshots", r, "--password-file", p(&pwfile)],
        &[("VOLBACK_PASSWORD", wrong)],
    );
    ok(
        &["snapshots", r],
        &[
            ("VOLBACK_PASSWORD_FILE", p(&pwfile)),
            ("VOLBACK_PASSWORD", wrong),
        ],
    );
    ok(
        &[
            "snapshots",
            r,
            "--password-command",
            "printf 'first password\\n'",
        ],
        &[("VOLBACK_PASSWORD", wrong)],
    );

    // Wrong password: exit 1, says so, nothing written.
    let before = files_under(&repo);
    let e = vb(&["snapshots", r], wrong).expect_code(1);
    e.stderr_has(&["password"]);
    let e = vb(&["backup", p(&src), r], wrong).expect_code(1);
    e.stderr_has(&["password"]);
    assert_eq!(files_under(&repo), before, "a refused command wrote");
    // A failing password command and an empty password are refused.
    volback_raw(
        &["snapshots", r, "--password-command", "exit 3"],
        &[],
        LIMIT,
    )
    .expect_code(1);
    let empty = t.join("empty");
    std::fs::write(&empty, "\n").unwrap();
    volback_raw(&["snapshots", r, "--password-file", p(&empty)], &[], LIMIT)
        .expect_code(1)
        .stderr_has(&["password"]);

    // Missing password without a terminal: a clear error listing the ways, at once.
    for cmd in [
        vec!["snapshots", r],
        vec!["restore", r, "latest", p(&t.join("o.img"))],
        vec!["backup", p(&src), r],
        vec!["verify", r],
    ] {
        let e = volback_raw(&cmd, &[], LIMIT).expect_code(1);
        e.stderr_has(&["--password-file", "VOLBACK_PASSWORD"]);
        let mut c = std::process::Command::new(VOLBACK);
        c.args(&cmd);
        for v in PASSWORD_VARS {
            c.env_remove(v);
        }
        let e = run_with_limit(
            c,
            &format!("volback {} <open pipe", cmd.join(" ")),
            LIMIT,
            true,
        )
        .expect_code(1);
        e.stderr_has(&["--password-file"]);
    }
    assert_eq!(files_under(&repo), before, "a refused command wrote");
}

/// The JSON of `key list --json`: an array of slots, or an object holding one.
fn key_list(repo: &Path, pw: &str) -> Vec<serde_json::Value> {
    let v = vb_ok(&["key", "list", "--json", p(repo)], pw).json();
    match v {
        serde_json::Value::Array(a) => a,
        serde_json::Value::Object(o) => o
            .get("slots")
            .and_then(|s| s.as_array())
            .cloned()
            .unwrap_or_else(|| panic!("key list --json: {o:?}")),
        other => panic!("key list --json printed {other}"),
    }
}

/// `key add | list | remove | passwd` keep every snapshot readable; a removed slot's password
/// no longer opens; the last slot and the slot in use cannot be removed.
#[test]
fn key_add_remove_and_passwd_keep_every_snapshot_readable() {
    let t = TestDir::new();
    let repo = t.join("repo");
    let r = p(&repo);
    let (pw1, pw2, pw3, pw4) = ("password one", "password two", "password three", "four");
    init_with(&repo, pw1, &[]);
    let src = t.join("src.img");
    mixed_source(&src, 6 * MIB as usize, 1430);
    vb_ok(&["backup", p(&src), r], pw1);
    write_at(&src, MIB, &Rng::new(1431).bytes(MIB as usize));
    vb_ok(&["backup", p(&src), r], pw1);
    let ids = ids_with(&repo, pw1);
    assert_eq!(ids.len(), 2);
    let shas: Vec<String> = ids
        .iter()
        .map(|id| restored_sha(&repo, id, pw1, t.path()))
        .collect();
    let all_readable = |pw: &str| {
        assert_eq!(ids_with(&repo, pw), ids);
        for (id, sha) in ids.iter().zip(&shas) {
            assert_eq!(&restored_sha(&repo, id, pw, t.path()), sha, "snapshot {id}");
        }
    };
    let slot1 = key_slots(&repo)[0].clone();

    // key add: the new password from VOLBACK_NEW_PASSWORD, then from --new-password-file.
    let mut add = vec!["key", "add", r];
    add.extend_from_slice(&CHEAP_KDF);
    volback_raw(
        &add,
        &[("VOLBACK_PASSWORD", pw1), ("VOLBACK_NEW_PASSWORD", pw2)],
        LIMIT,
    )
    .expect_code(0);
    let slots = key_slots(&repo);
    assert_eq!(slots.len(), 2, "{slots:?}");
    let slot2 = slots.iter().find(|s| **s != slot1).unwrap().clone();
    let newfile = t.join("new");
    std::fs::write(&newfile, format!("{pw3}\n")).unwrap();
    let mut add3 = add.clone();
    add3.extend(["--new-password-file", p(&newfile)]);
    vb_ok(&add3, pw2);
    let slots = key_slots(&repo);
    assert_eq!(slots.len(), 3, "{slots:?}");
    let slot3 = slots
        .iter()
        .find(|s| **s != slot1 && **s != slot2)
        .unwrap()
        .clone();
    let listed: BTreeSet<String> = key_list(&repo, pw3)
        .iter()
        .map(|s| jstr(s, "/id").to_string())
        .collect();
    assert_eq!(listed, slots.iter().cloned().collect(), "key list");
    for pw in [pw1, pw2, pw3] {
        all_readable(pw);
    }

    // key remove: the slot in use is refused; another one goes, and its password with it.
    vb(&["key", "remove", r, &slot2], pw2).expect_code(1);
    assert!(repo.join("keys").join(&slot2).exists());
    vb_ok(&["key", "remove", r, &slot2], pw1);
    assert!(!repo.join("keys").join(&slot2).exists());
    vb(&["snapshots", r], pw2)
        .expect_code(1)
        .stderr_has(&["password"]);
    vb(&["key", "remove", r, "0123456789abcdef"], pw1).expect_code(1);
    vb_ok(&["key", "remove", r, &slot3], pw1);
    all_readable(pw1);
    // The last slot cannot be removed.
    vb(&["key", "remove", r, &slot1], pw1).expect_code(1);
    assert_eq!(key_slots(&repo), vec![slot1.clone()]);

    // key passwd: the old password stops working, the new one opens everything.
    let mut passwd = vec!["key", "passwd", r];
    passwd.extend_from_slice(&CHEAP_KDF);
    volback_raw(
        &passwd,
        &[("VOLBACK_PASSWORD", pw1), ("VOLBACK_NEW_PASSWORD", pw4)],
        LIMIT,
    )
    .expect_code(0);
    vb(&["snapshots", r], pw1)
        .expect_code(1)
        .stderr_has(&["password"]);
    assert_eq!(key_slots(&repo).len(), 1);
    all_readable(pw4);
    vb_ok(&["verify", "--read-data", r], pw4);
    // A new password is never read from a non-terminal stdin.
    volback_raw(&passwd, &[("VOLBACK_PASSWORD", pw4)], LIMIT).expect_code(1);

    // A repository whose slots were all deleted says so.
    let bare = t.join("bare");
    copy_dir(&repo, &bare);
    for s in key_slots(&bare) {
        std::fs::remove_file(bare.join("keys").join(s)).unwrap();
    }
    vb(&["snapshots", p(&bare)], pw4)
        .expect_code(1)
        .stderr_has(&["key"]);
}

/// Acceptance "crash": `key add` and `key passwd` aborted (as by kill -9: no cleanup) at each
/// crash point leave a repository that the old password opens (and the new one too once its
/// slot is durable), with every snapshot readable, and the next key command works.
#[test]
fn key_commands_killed_at_each_point_leave_an_openable_repository() {
    let t = TestDir::new();
    let pristine = t.join("pristine");
    let (old, new) = ("old password", "new password");
    init_with(&pristine, old, &[]);
    let src = t.join("src.img");
    mixed_source(&src, 3 * MIB as usize, 1440);
    vb_ok(&["backup", p(&src), p(&pristine)], old);
    let id = ids_with(&pristine, old)[0].clone();
    let sha = restored_sha(&pristine, &id, old, t.path());

    // `key-slot-written` is a point of `passwd` only (the old slot is still there); `add` has
    // nothing to remove.
    for (cmd, point) in [
        ("add", "key-slot-temp"),
        ("passwd", "key-slot-temp"),
        ("passwd", "key-slot-written"),
    ] {
        let repo = t.join(&format!("{cmd}-{point}"));
        copy_dir(&pristine, &repo);
        let mut args = vec!["key", cmd, p(&repo)];
        args.extend_from_slice(&CHEAP_KDF);
        let r = volback_raw(
            &args,
            &[
                ("VOLBACK_PASSWORD", old),
                ("VOLBACK_NEW_PASSWORD", new),
                ("VOLBACK_TEST_ABORT_AT", point),
            ],
            LIMIT,
        );
        assert_eq!(r.code, None, "`key {cmd}` did not abort at {point}: {r:?}");
        let opens = |pw: &str| vb(&["snapshots", p(&repo)], pw).code == Some(0);
        assert!(
            opens(old),
            "key {cmd} killed at {point}: the old password no longer opens"
        );
        if point == "key-slot-written" {
            assert!(
                opens(new),
                "key {cmd} killed at {point}: the new slot is not durable"
            );
        }
        assert_eq!(restored_sha(&repo, &id, old, t.path()), sha);
        // The next key command works over what the crash left.
        let listed = key_list(&repo, old);
        assert!(!listed.is_empty());
        let mut again = vec!["key", "passwd", p(&repo)];
        again.extend_from_slice(&CHEAP_KDF);
        volback_raw(
            &again,
            &[("VOLBACK_PASSWORD", old), ("VOLBACK_NEW_PASSWORD", "third")],
            LIMIT,
        )
        .expect_code(0);
        assert_eq!(restored_sha(&repo, &id, "third", t.path()), sha);
    }
}

/// Plain repositories made without encryption (format 2, `--no-encryption`) and format-1
/// repositories still open, back up (format 2) and restore without a password, and refuse a
/// password from any source (the downgrade defence).
#[test]
fn plain_repositories_work_without_a_password_and_refuse_one() {
    let t = TestDir::new();
    let repo = t.join("plain");
    let r = p(&repo);
    init_repo(&repo, &["--no-encryption"]);
    let src = t.join("src.img");
    mixed_source(&src, 4 * MIB as usize, 1450);
    backup_json(&src, &repo, &[]);
    let sha1 = sha256_file(&src);
    write_at(&src, MIB, &Rng::new(1451).bytes(64 * KIB as usize));
    let rep = backup_json(&src, &repo, &[]);
    assert!(ju64(&rep, "/new_bytes") < 2 * MIB, "an incremental: {rep}");
    let ids = snapshot_ids(&repo);
    assert_eq!(ids.len(), 2);
    let out = t.join("out.img");
    restore(&repo, &ids[0], &out);
    assert_eq!(sha256_file(&out), sha1);
    std::fs::remove_file(&out).unwrap();
    restore(&repo, &ids[1], &out);
    assert_eq!(sha256_file(&out), sha256_file(&src));
    volback_ok(&["verify", "--read-data", r]).stdout_has(&["no problems"]);
    assert_eq!(repo_config(&repo)["version"], 2);

    let pwfile = t.join("pw");
    std::fs::write(&pwfile, "a password\n").unwrap();
    let before = files_under(&repo);
    let refused = |args: &[&str], env: &[(&str, &str)]| {
        volback_raw(args, env, LIMIT)
            .expect_code(1)
            .stderr_has(&["password"]);
    };
    for env in [
        vec![("VOLBACK_PASSWORD", "a password")],
        vec![("VOLBACK_PASSWORD_FILE", p(&pwfile))],
    ] {
        refused(&["snapshots", r], &env);
        refused(&["backup", p(&src), r], &env);
        refused(&["restore", r, "latest", p(&t.join("o.img"))], &env);
        refused(&["verify", r], &env);
    }
    refused(&["snapshots", r, "--password-file", p(&pwfile)], &[]);
    refused(&["snapshots", r, "--password-command", "echo x"], &[]);
    assert_eq!(files_under(&repo), before, "a refused command wrote");
    assert_eq!(snapshot_ids(&repo), ids);

    // Format 1 (read-only since format 2): read without a password, a password refused.
    let old = t.join("format1");
    let (volume, sid, _) = crate::old_formats::format1_repository(&old);
    let out1 = t.join("out1.img");
    restore(&old, &sid, &out1);
    assert_eq!(std::fs::read(&out1).unwrap(), volume);
    volback_ok(&["verify", "--read-data", p(&old)]);
    refused(
        &["snapshots", p(&old)],
        &[("VOLBACK_PASSWORD", "a password")],
    );
}
