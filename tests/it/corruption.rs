//! Damaged repositories: flipped bytes in chunks, truncated snapshots, missing chunks, bad
//! configs, bad snapshot selectors. Every case must give a clear error naming what is wrong,
//! with exit code 1, and never a panic.

use crate::util::*;
use std::path::{Path, PathBuf};

const BS: u64 = 64 * KIB;

/// A repository with two snapshots (of two files with the same content, so they share every
/// chunk): 4 MiB of random data followed by 1 MiB of text. Each is read in two runs (a read
/// request is at most 4 MiB), stored as two packs: blocks 0-63 (random, stored raw) and
/// 64-79 (text, compressed).
struct Fixture {
    t: TestDir,
    repo: PathBuf,
    data: Vec<u8>,
    snap_a: String,
    snap_b: String,
}

impl Fixture {
    fn new(seed: u64) -> Fixture {
        let t = TestDir::new();
        let repo = t.join("repo");
        let mut rng = Rng::new(seed);
        let mut data = rng.bytes(4 * MIB as usize);
        data.extend(rng.text(MIB as usize));
        let a = t.join("a.img");
        let b = t.join("b.img");
        std::fs::write(&a, &data).unwrap();
        std::fs::write(&b, &data).unwrap();
        init_repo(&repo, &["--block-size", "64K"]);
        let snap_a = jstr(&backup_json(&a, &repo, &[]), "/snapshot").to_string();
        let snap_b = jstr(&backup_json(&b, &repo, &[]), "/snapshot").to_string();
        Fixture {
            t,
            repo,
            data,
            snap_a,
            snap_b,
        }
    }

    fn block(&self, index: u64) -> &[u8] {
        let s = (index * BS) as usize;
        &self.data[s..s + BS as usize]
    }

    /// Id and path of the chunk (a pack) holding block `index`.
    fn chunk_of(&self, index: u64) -> (String, PathBuf) {
        let (id, path, content) = chunk_of_block(&self.repo, &self.snap_a, index);
        assert_eq!(content, blake3_hex(self.block(index)));
        (id, path)
    }

    fn snapshot_file(&self, id: &str) -> PathBuf {
        self.repo.join("snapshots").join(id)
    }

    fn r(&self) -> &str {
        p(&self.repo)
    }
}

fn flip_byte(path: &Path, offset: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    assert!(offset < bytes.len());
    bytes[offset] ^= 0x5a;
    std::fs::write(path, &bytes).unwrap();
}

#[test]
fn flipped_byte_in_a_chunk_is_found_by_verify_and_stops_restore() {
    let f = Fixture::new(30);
    // Block 5 is random (its pack is stored raw), block 70 is text (compressed).
    let (raw_id, raw_path) = f.chunk_of(5);
    let (zst_id, zst_path) = f.chunk_of(70);
    assert_eq!(f.chunk_of(63).0, raw_id, "blocks 0-63 share a pack");
    assert_eq!(f.chunk_of(64).0, zst_id, "blocks 64-79 share a pack");
    assert_eq!(
        std::fs::metadata(&raw_path).unwrap().len(),
        16 + 4 * MIB,
        "random data is stored raw"
    );
    assert!(
        std::fs::metadata(&zst_path).unwrap().len() < MIB / 2,
        "text is compressed"
    );
    // Quick verify passes before and after: it does not re-hash.
    volback_ok(&["verify", "--read-data", f.r()]).stdout_has(&["no problems"]);
    flip_byte(&raw_path, 16 + 1000);
    flip_byte(&zst_path, 16 + 200);
    volback_ok(&["verify", f.r()]);

    let r = volback_code(&["verify", "--read-data", f.r()], 1);
    r.stdout_has(&["2 problems", "moved aside"]);
    // Both damaged chunks were moved aside (docs/REPAIR.md): from now on they are missing.
    for path in [&raw_path, &zst_path] {
        assert!(!path.exists(), "{} still in place", path.display());
        assert!(
            path.with_file_name(format!(
                "{}.bad",
                path.file_name().unwrap().to_string_lossy()
            ))
            .exists()
        );
    }
    // Reported per snapshot from the first block of each pack.
    for (id, block) in [(&raw_id, 0), (&zst_id, 64)] {
        let offset = (block * BS).to_string();
        r.stdout_has(&[
            &format!("BAD chunk {id}"),
            &format!("affects snapshot {} at offset {offset}", &f.snap_a[..12]),
            &format!("affects snapshot {} at offset {offset}", &f.snap_b[..12]),
        ]);
    }

    // The same in JSON.
    let j = volback_code(&["verify", "--read-data", "--json", f.r()], 1).json();
    let problems = j["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 2, "{j}");
    let raw = problems
        .iter()
        .find(|pr| pr["chunk"] == raw_id.as_str())
        .unwrap_or_else(|| panic!("chunk {raw_id} not reported: {j}"));
    // Every block of the pack, in both snapshots.
    let affected = raw["affected"].as_array().unwrap();
    assert_eq!(affected.len(), 2 * 64, "{raw}");
    assert!(
        affected
            .iter()
            .any(|a| a["snapshot"] == f.snap_a.as_str() && a["offset"] == 5 * BS)
    );
    assert!(jstr(raw, "/detail").contains("missing"), "{raw}");

    // Verifying one snapshot reports only that snapshot.
    volback_code(&["verify", "--read-data", f.r(), &f.snap_b[..8]], 1)
        .stdout_has(&[&raw_id, &f.snap_b[..12]]);

    // Restore stops with an error naming the chunk.
    let out = f.t.join("out.img");
    volback_code(&["restore", f.r(), &f.snap_a, p(&out)], 1).stderr_has(&["missing"]);
    let e = volback_code(&["restore", f.r(), &f.snap_b, p(&out)], 1);
    assert!(
        e.stderr.contains(&raw_id) || e.stderr.contains(&zst_id),
        "restore error does not name the bad chunk: {}",
        e.stderr
    );
    e.stderr_has(&["missing"]);
}

#[test]
fn truncated_snapshot_file_gives_clear_errors() {
    let f = Fixture::new(31);
    let path = f.snapshot_file(&f.snap_a);
    let original = std::fs::read(&path).unwrap();
    let out = f.t.join("out.img");
    for len in [0, 10, 63, 64, original.len() / 2, original.len() - 1] {
        std::fs::write(&path, &original[..len]).unwrap();
        let what = format!("truncated to {len} of {} bytes", original.len());

        // Each error names the damaged file.
        let file = format!("snapshots/{}", f.snap_a);
        // `snapshots` still lists the healthy snapshot.
        volback_code(&["snapshots", f.r()], 1)
            .stderr_has(&[&file, "corrupt"])
            .stdout_has(&[&f.snap_b[..12], "1 snapshots"]);
        volback_code(&["restore", f.r(), &f.snap_a[..10], p(&out)], 1).stderr_has(&[&file]);
        // `latest` skips the damaged (older) snapshot, saying so.
        volback_ok(&["restore", f.r(), "latest", p(&out)])
            .stderr_has(&[&file, "skipping unreadable snapshot"]);
        let r = volback_code(&["verify", f.r()], 1);
        assert!(
            r.stdout.contains(&format!("BAD snapshot {}", f.snap_a)),
            "verify, {what}: {}",
            r.all_output()
        );
        // The other snapshot is unaffected.
        volback_ok(&["verify", "--read-data", f.r(), &f.snap_b]);
        volback_ok(&["restore", f.r(), &f.snap_b, p(&out)]);
        assert_eq!(sha256_file(&out), sha256_bytes(&f.data));
    }
    // A byte flipped inside the snapshot file is caught by its checksums too.
    let mut bad = original.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    std::fs::write(&path, &bad).unwrap();
    let r = volback_code(&["verify", f.r()], 1);
    assert!(
        r.stdout.contains(&format!("BAD snapshot {}", f.snap_a)),
        "{}",
        r.stdout
    );
    volback_code(&["restore", f.r(), &f.snap_a, p(&out)], 1);

    // A new backup still works: it skips the damaged snapshot as a parent.
    let a = f.t.join("a.img");
    let j = backup_json(&a, &f.repo, &[]);
    assert_eq!(ju64(&j, "/new_chunks"), 0, "{j}");
    std::fs::write(&path, &original).unwrap();
    volback_ok(&["verify", "--read-data", f.r()]).stdout_has(&["checked 3 snapshots"]);
}

#[test]
fn missing_chunk_is_reported_with_affected_offsets() {
    let f = Fixture::new(32);
    let (id, path) = f.chunk_of(3);
    std::fs::remove_file(&path).unwrap();
    // The pack of block 3 holds blocks 0-63: reported from its first block.
    let offset = 0.to_string();
    for extra in [&[][..], &["--read-data"][..]] {
        let mut args = vec!["verify"];
        args.extend_from_slice(extra);
        args.push(f.r());
        volback_code(&args, 1).stdout_has(&[
            &id,
            "missing",
            &format!("affects snapshot {} at offset {offset}", &f.snap_a[..12]),
            &format!("affects snapshot {} at offset {offset}", &f.snap_b[..12]),
        ]);
    }
    let out = f.t.join("out.img");
    volback_code(&["restore", f.r(), &f.snap_a, p(&out)], 1).stderr_has(&[&id, "missing"]);

    // A truncated chunk file (as a power cut could leave) is reported without --read-data.
    let (id2, path2) = f.chunk_of(70);
    let bytes = std::fs::read(&path2).unwrap();
    std::fs::write(&path2, &bytes[..bytes.len() / 2]).unwrap();
    volback_code(&["verify", f.r()], 1).stdout_has(&[&id2]);
    // A backup of another volume with the same content stores the missing and truncated
    // chunks again, which repairs the older snapshots too.
    let c = f.t.join("c.img");
    std::fs::write(&c, &f.data).unwrap();
    let j = backup_json(&c, &f.repo, &[]);
    assert_eq!(ju64(&j, "/new_chunks"), 2, "{j}");
    volback_ok(&["verify", "--read-data", f.r()]).stdout_has(&["no problems"]);
}

#[test]
fn incremental_backup_stores_a_lost_parent_chunk_again() {
    let f = Fixture::new(34);
    let (id, path) = f.chunk_of(4);
    std::fs::remove_file(&path).unwrap();
    // Same volume, unchanged content: the block matches the parent's hash, but its chunk is
    // gone, so it must be stored again rather than carried into the new snapshot.
    let a = f.t.join("a.img");
    let j = backup_json(&a, &f.repo, &[]);
    assert_eq!(ju64(&j, "/new_chunks"), 1, "{j}");
    assert!(path.is_file(), "chunk {id} stored again");
    volback_ok(&["verify", "--read-data", f.r()]).stdout_has(&["no problems"]);
}

#[test]
fn unsupported_repository_version_is_named() {
    let f = Fixture::new(33);
    let cfg_path = f.repo.join("config");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["version"] = 99.into();
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    let a = f.t.join("a.img");
    let out = f.t.join("out.img");
    for args in [
        vec!["snapshots", f.r()],
        vec!["verify", f.r()],
        vec!["backup", p(&a), f.r()],
        vec!["restore", f.r(), "latest", p(&out)],
    ] {
        volback_code(&args, 1).stderr_has(&["version 99"]);
    }
    assert!(!out.exists());
}

#[test]
fn bad_or_missing_config_is_reported() {
    let f = Fixture::new(34);
    let cfg_path = f.repo.join("config");
    let original = std::fs::read(&cfg_path).unwrap();
    let good: serde_json::Value = serde_json::from_slice(&original).unwrap();
    let with = |key: &str, value: serde_json::Value| {
        let mut v = good.clone();
        v[key] = value;
        serde_json::to_vec(&v).unwrap()
    };
    let mut no_hash = good.clone();
    no_hash.as_object_mut().unwrap().remove("chunk_hash");
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        (
            "garbage",
            b"\x00\x01\x02 not json {{".to_vec(),
            &["config", "corrupt"],
        ),
        ("empty", Vec::new(), &["config", "corrupt"]),
        (
            "json array",
            b"[1, 2, 3]".to_vec(),
            &["not a volback repository"],
        ),
        (
            "other format",
            with("format", "restic".into()),
            &["not a volback repository"],
        ),
        (
            "missing field",
            serde_json::to_vec(&no_hash).unwrap(),
            &["config", "corrupt"],
        ),
        (
            "bad block size",
            with("block_size", 3.into()),
            &["config", "corrupt", "block size"],
        ),
        (
            "unknown hash",
            with("chunk_hash", "md5".into()),
            &["config", "corrupt"],
        ),
        ("huge", vec![b' '; 3 << 20], &["config"]),
    ];
    for (name, bytes, needles) in cases {
        std::fs::write(&cfg_path, &bytes).unwrap();
        let r = volback_code(&["snapshots", f.r()], 1);
        assert!(
            !r.stderr.is_empty(),
            "{name}: no error message: {}",
            r.all_output()
        );
        r.stderr_has(needles);
    }
    std::fs::remove_file(&cfg_path).unwrap();
    for args in [vec!["snapshots", f.r()], vec!["verify", f.r()]] {
        volback_code(&args, 1).stderr_has(&["not a volback repository", "volback init"]);
    }
    let nowhere = f.t.join("does-not-exist");
    volback_code(&["snapshots", p(&nowhere)], 1).stderr_has(&["does-not-exist"]);
    std::fs::write(&cfg_path, &original).unwrap();
    volback_ok(&["verify", f.r()]);
}

#[test]
fn ambiguous_and_unknown_snapshot_selectors() {
    let t = TestDir::new();
    let repo = t.join("repo");
    let r = p(&repo);
    init_repo(&repo, &["--block-size", "4K"]);
    let out = t.join("out.img");
    volback_code(&["restore", r, "latest", p(&out)], 1).stderr_has(&["no snapshot matches"]);

    // Back up small distinct volumes until two snapshot ids share their first digit (at most
    // 17 by the pigeonhole principle).
    let mut ids: Vec<String> = Vec::new();
    let mut rng = Rng::new(35);
    let shared = loop {
        let src = t.join(&format!("v{}.img", ids.len()));
        std::fs::write(&src, rng.bytes(4096)).unwrap();
        let id = jstr(&backup_json(&src, &repo, &[]), "/snapshot").to_string();
        if let Some(other) = ids.iter().find(|o| o[..1] == id[..1]) {
            break (other.clone(), id);
        }
        ids.push(id);
        assert!(ids.len() <= 16);
    };
    let prefix = &shared.0[..1];
    for args in [
        vec!["restore", r, prefix, p(&out)],
        vec!["verify", r, prefix],
    ] {
        volback_code(&args, 1).stderr_has(&["ambiguous", &shared.0[..12], &shared.1[..12]]);
    }
    assert!(!out.exists());

    // A longer prefix resolves.
    let unique = &shared.1[..20];
    restore(&repo, unique, &out);

    // Unknown selectors.
    ids.push(shared.1.clone());
    let absent = (0..16u32)
        .map(|d| format!("{:x}{}", d, &shared.0[1..12]))
        .find(|c| !ids.iter().any(|id| id.starts_with(c.as_str())))
        .unwrap();
    for sel in [
        absent.as_str(),
        "not-a-snapshot",
        "latest:/no/such/source.img",
        "",
    ] {
        volback_code(&["restore", r, sel, p(&out)], 1).stderr_has(&["no snapshot matches", sel]);
        volback_code(&["verify", r, sel], 1).stderr_has(&["no snapshot matches"]);
    }
}
