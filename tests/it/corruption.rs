//! Damaged repositories: flipped bytes in packs, truncated snapshots, missing packs, bad
//! configs, bad snapshot selectors. Every case must give a clear error naming what is wrong,
//! with exit code 1, and never a panic.

use crate::util::*;
use std::path::{Path, PathBuf};

const BS: u64 = 64 * KIB;

/// A repository with two snapshots (of two files with the same content, so they share every
/// blob): 4 MiB of random data, 1 MiB of text and 1 MiB of random data, in 64 KiB blocks
/// (one block per blob at this size) and packs of about 1 MiB, so that one damaged pack holds
/// a few blocks and not the snapshots' trees (written after the data).
struct Fixture {
    t: TestDir,
    repo: PathBuf,
    data: Vec<u8>,
    snap_a: String,
    snap_b: String,
}

impl Fixture {
    fn new(seed: u64) -> Fixture {
        Fixture::with(seed, &[])
    }

    /// A plain repository (`--no-encryption`), for tests that read frame headers or damage
    /// one blob inside a frame (a sealed frame fails as a whole).
    fn plain(seed: u64) -> Fixture {
        Fixture::with(seed, &["--no-encryption"])
    }

    fn with(seed: u64, extra: &[&str]) -> Fixture {
        let t = TestDir::new();
        let repo = t.join("repo");
        let mut rng = Rng::new(seed);
        let mut data = rng.bytes(4 * MIB as usize);
        data.extend(rng.text(MIB as usize));
        data.extend(rng.bytes(MIB as usize));
        let a = t.join("a.img");
        let b = t.join("b.img");
        std::fs::write(&a, &data).unwrap();
        std::fs::write(&b, &data).unwrap();
        init_repo(
            &repo,
            &[&["--block-size", "64K", "--pack-size", "1M"], extra].concat(),
        );
        // One worker: frames reach the packs in volume order.
        let one = ["--threads", "1"];
        let snap_a = jstr(&backup_json(&a, &repo, &one), "/snapshot").to_string();
        let snap_b = jstr(&backup_json(&b, &repo, &one), "/snapshot").to_string();
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

    /// Where block `index` is stored (a pack of data blobs only).
    fn loc(&self, index: u64) -> BlockLoc {
        let loc = locate_block(&self.repo, &self.snap_a, index);
        assert_eq!(
            loc.blob,
            repo_hash(&self.repo, self.block(index)),
            "one block, one blob"
        );
        assert_eq!(loc.piece, 0);
        assert!(
            !pack_has_tree_blobs(&loc.pack_path),
            "block {index} shares its pack with tree blobs"
        );
        loc
    }

    fn snapshot_file(&self, id: &str) -> PathBuf {
        self.repo.join("snapshots").join(id)
    }

    fn r(&self) -> &str {
        p(&self.repo)
    }
}

/// The codec byte of the frame an entry points to (0 raw, 1 zstd).
fn frame_codec(loc: &BlockLoc) -> u8 {
    let b = std::fs::read(&loc.pack_path).unwrap();
    b[loc.entry.frame_offset as usize + 5]
}

#[test]
fn flipped_byte_in_a_pack_is_found_by_verify_and_stops_restore() {
    let f = Fixture::plain(30);
    // Block 5 is random (its frame is stored raw), block 70 is text (compressed).
    let raw = f.loc(5);
    let zst = f.loc(70);
    assert_ne!(
        raw.pack, zst.pack,
        "random data and text are in different packs"
    );
    assert_eq!(frame_codec(&raw), 0, "random data is stored raw");
    assert_eq!(frame_codec(&zst), 1, "text is compressed");
    assert!(zst.entry.frame_len < MIB / 2, "text is compressed");
    volback_ok(&["verify", "--read-data", f.r()]).stdout_has(&["no problems"]);
    assert!(
        corrupt_frame(&raw.pack_path, &raw.entry),
        "raw frame: one blob damaged"
    );
    assert!(
        !corrupt_frame(&zst.pack_path, &zst.entry),
        "zstd frame: the frame damaged"
    );
    let raw_bytes = std::fs::read(&raw.pack_path).unwrap();
    // Quick verify passes: it does not read packs.
    volback_ok(&["verify", f.r()]);

    let r = volback_code(&["verify", "--read-data", f.r()], 1);
    // Both damaged packs were set aside (docs/REPAIR.md): from now on they are missing.
    for loc in [&raw, &zst] {
        assert!(
            !loc.pack_path.exists(),
            "{} still in place",
            loc.pack_path.display()
        );
        assert!(
            loc.pack_path
                .with_file_name(format!("{}.bad", loc.pack))
                .exists(),
            "{} not set aside",
            loc.pack
        );
        r.stdout_has(&[&loc.pack, &f.snap_a[..12], &f.snap_b[..12]]);
    }
    // The damaged blob is named.
    r.stdout_has(&[&raw.blob]);
    assert_eq!(
        std::fs::read(raw.pack_path.with_file_name(format!("{}.bad", raw.pack))).unwrap(),
        raw_bytes,
        "set aside as it was"
    );

    // The same in JSON: now both packs are missing.
    let j = volback_code(&["verify", "--read-data", "--json", f.r()], 1).json();
    let problems = j["problems"].as_array().unwrap();
    assert!(!problems.is_empty(), "{j}");
    let text = j.to_string();
    assert!(text.contains(&raw.pack) && text.contains(&zst.pack), "{j}");
    assert!(
        text.contains(&f.snap_a) || text.contains(&f.snap_a[..12]),
        "{j}"
    );

    // Verifying one snapshot reports only that snapshot.
    let one = volback_code(&["verify", "--read-data", f.r(), &f.snap_b[..8]], 1);
    one.stdout_has(&[&raw.pack, &f.snap_b[..12]]);
    assert!(!one.stdout.contains(&f.snap_a[..12]), "{}", one.stdout);

    // Restore stops with an error naming the pack.
    let out = f.t.join("out.img");
    volback_code(&["restore", f.r(), &f.snap_a, p(&out)], 1).stderr_has(&["missing"]);
    let e = volback_code(&["restore", f.r(), &f.snap_b, p(&out)], 1);
    assert!(
        e.stderr.contains(&raw.pack[..12]) || e.stderr.contains(&zst.pack[..12]),
        "restore error does not name the bad pack: {}",
        e.stderr
    );
    e.stderr_has(&["missing"]);
    assert!(!out.exists(), "a failed restore left its file");
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

/// Data blobs of `pack` (as indexed) that no other existing pack holds.
fn blobs_only_in(repo: &Path, pack: &str) -> usize {
    let idx = read_index(repo);
    idx.packs[pack]
        .iter()
        .filter(|e| e.kind == 0)
        .filter(|e| {
            idx.locations(&e.id)
                .iter()
                .all(|(p, _)| p == pack || !pack_path(repo, p).exists())
        })
        .count()
}

#[test]
fn missing_pack_is_reported_with_affected_snapshots() {
    let f = Fixture::new(32);
    let lost = f.loc(3);
    let lost_blobs = blobs_only_in(&f.repo, &lost.pack);
    assert!(lost_blobs >= 1);
    std::fs::remove_file(&lost.pack_path).unwrap();
    for extra in [&[][..], &["--read-data"][..]] {
        let mut args = vec!["verify"];
        args.extend_from_slice(extra);
        args.push(f.r());
        volback_code(&args, 1).stdout_has(&[
            &lost.pack,
            "missing",
            &f.snap_a[..12],
            &f.snap_b[..12],
        ]);
    }
    let out = f.t.join("out.img");
    volback_code(&["restore", f.r(), &f.snap_a, p(&out)], 1)
        .stderr_has(&[&lost.pack[..12], "missing"]);

    // A truncated pack (as a power cut could leave) is found by reading it, and set aside.
    let cut = f.loc(70);
    assert_ne!(cut.pack, lost.pack);
    let bytes = std::fs::read(&cut.pack_path).unwrap();
    std::fs::write(&cut.pack_path, &bytes[..bytes.len() / 2]).unwrap();
    volback_code(&["verify", "--read-data", f.r()], 1).stdout_has(&[&cut.pack]);
    assert!(!cut.pack_path.exists());
    // What verify could read of the set-aside pack it stored again; the rest is lost.
    let cut_blobs = blobs_only_in(&f.repo, &cut.pack);
    // A backup of another volume with the same content stores the lost blobs of the missing
    // and the set-aside pack again (and only those), which repairs the older snapshots too.
    let c = f.t.join("c.img");
    std::fs::write(&c, &f.data).unwrap();
    let j = backup_json(&c, &f.repo, &[]);
    assert_eq!(
        ju64(&j, "/new_bytes"),
        (lost_blobs + cut_blobs) as u64 * BS,
        "{j}"
    );
    volback_ok(&["verify", "--read-data", f.r()]).stdout_has(&["no problems"]);
    for snap in [&f.snap_a, &f.snap_b] {
        restore(&f.repo, snap, &out);
        assert_eq!(sha256_file(&out), sha256_bytes(&f.data));
    }
}

#[test]
fn incremental_backup_stores_lost_parent_blobs_again() {
    let f = Fixture::new(34);
    let lost = f.loc(4);
    let lost_blobs = blobs_only_in(&f.repo, &lost.pack);
    std::fs::remove_file(&lost.pack_path).unwrap();
    // Same volume, unchanged content: the blocks match the parent's, but their pack is
    // gone, so they must be stored again rather than carried into the new snapshot.
    let a = f.t.join("a.img");
    let j = backup_json(&a, &f.repo, &[]);
    assert_eq!(ju64(&j, "/new_bytes"), lost_blobs as u64 * BS, "{j}");
    let idx = read_index(&f.repo);
    assert!(
        idx.locations(&lost.blob)
            .iter()
            .any(|(p, _)| pack_path(&f.repo, p).is_file()),
        "blob {} stored again in an existing pack",
        lost.blob
    );
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
