//! Backup and restore of image files (no root needed): bit-exact restores, forever-incremental
//! backups, snapshot selectors, sparse restores, SHA-256 repositories and deduplication.
//! Backups use 64 KiB blocks: at that size every block is one blob (FORMAT.md §F2.4), so
//! new bytes count new blocks. (`new_chunks` counts the frames a run wrote.)

use crate::util::*;

const BS: u64 = 64 * KIB;

/// A 40 MiB + 12,345-byte sparse image: random data, text, written zeros, big holes and a
/// partial last block.
fn make_mixed_source(path: &std::path::Path, rng: &mut Rng) -> u64 {
    let size = 40 * MIB + 12_345;
    sparse_file(path, size);
    write_at(path, 0, &rng.bytes(4 * MIB as usize));
    write_at(path, 4 * MIB, &rng.text(2 * MIB as usize));
    write_at(path, 6 * MIB, &vec![0u8; 2 * MIB as usize]);
    // 8 MiB .. 30 MiB: hole
    write_at(path, 30 * MIB, &rng.bytes(MIB as usize + 777));
    // … hole until the tail
    write_at(path, size - 5_000, &rng.text(5_000));
    size
}

#[test]
fn sparse_image_full_then_incremental_restores_bit_exact() {
    let t = TestDir::new();
    let src = t.join("disk.img");
    let repo = t.join("repo");
    let mut rng = Rng::new(1);
    let size = make_mixed_source(&src, &mut rng);
    assert_ne!(size % BS, 0);
    init_repo(&repo, &[]);

    // Full backup.
    let sha1 = sha256_file(&src);
    let b1 = backup_json(&src, &repo, &["--block-size", "64K"]);
    let snap1 = jstr(&b1, "/snapshot").to_string();
    assert!(b1["parent"].is_null(), "first backup has no parent: {b1}");
    assert_eq!(b1["resumed"], false);
    let blocks = size.div_ceil(BS);
    assert_eq!(
        ju64(&b1, "/stats/data_blocks") + ju64(&b1, "/stats/zero_blocks"),
        blocks,
        "every block is data or zero: {b1}"
    );
    // Holes are not read: 22 MiB + most of the tail gap are holes.
    assert!(
        ju64(&b1, "/bytes_read") < size - 20 * MIB,
        "holes were read: {b1}"
    );
    // Written zeros are not stored: data = 4 + 2 + 1 MiB (+ partial blocks).
    let data_blocks = ju64(&b1, "/stats/data_blocks");
    assert!(
        (7 * MIB / BS..=7 * MIB / BS + 3).contains(&data_blocks),
        "unexpected data block count {data_blocks}: {b1}"
    );

    // Change a few regions: inside random data, inside a hole, the partial last block, and
    // random data overwritten by zeros.
    write_at(&src, MIB + 10, &rng.bytes(100));
    write_at(&src, 20 * MIB, &rng.text(BS as usize));
    write_at(&src, size - 10, b"0123456789");
    write_at(&src, 2 * MIB, &vec![0u8; BS as usize]);
    let sha2 = sha256_file(&src);
    assert_ne!(sha1, sha2);

    let b2 = backup_json(&src, &repo, &["--block-size", "64K"]);
    let snap2 = jstr(&b2, "/snapshot").to_string();
    assert_eq!(
        b2["parent"].as_str(),
        Some(snap1.as_str()),
        "second backup is incremental on the first: {b2}"
    );
    assert_eq!(b2["resumed"], false);
    let new_chunks = ju64(&b2, "/new_chunks");
    assert!(
        (1..=3).contains(&new_chunks),
        "three blocks changed to new content, {new_chunks} new frames: {b2}"
    );
    assert!(ju64(&b2, "/new_bytes") <= 3 * BS, "{b2}");
    assert!(
        ju64(&b2, "/stats/unchanged_blocks") >= data_blocks - 3,
        "unchanged blocks not recognised: {b2}"
    );

    // Restore each snapshot with each kind of selector.
    let r1 = t.join("r1.img");
    restore(&repo, &snap1[..10], &r1);
    assert_eq!(sha256_file(&r1), sha1, "snapshot 1 restored by id prefix");
    let r2 = t.join("r2.img");
    restore(&repo, "latest", &r2);
    assert_eq!(sha256_file(&r2), sha2, "snapshot 2 restored as latest");
    let r3 = t.join("r3.img");
    restore(&repo, &format!("latest:{}", p(&src)), &r3);
    assert_eq!(
        sha256_file(&r3),
        sha2,
        "snapshot 2 restored as latest:SOURCE"
    );
    let r4 = t.join("r4.img");
    restore(&repo, &snap2, &r4);
    assert_eq!(sha256_file(&r4), sha2, "snapshot 2 restored by full id");

    for r in [&r1, &r2] {
        assert_eq!(std::fs::metadata(r).unwrap().len(), size);
        let alloc = allocated_bytes(r);
        assert!(
            alloc < size - 20 * MIB,
            "{} is not sparse: {alloc} bytes allocated for {size}",
            r.display()
        );
    }

    volback_ok(&["verify", "--read-data", p(&repo)])
        .stdout_has(&["checked 2 snapshots", "no problems"]);
}

#[test]
fn restore_replaces_an_existing_larger_file() {
    let t = TestDir::new();
    let src = t.join("src.img");
    let repo = t.join("repo");
    let mut rng = Rng::new(2);
    sparse_file(&src, 3 * MIB + 100);
    write_at(&src, 0, &rng.bytes(MIB as usize));
    write_at(&src, 2 * MIB, &rng.text(MIB as usize + 100));
    init_repo(&repo, &[]);
    backup_json(&src, &repo, &["--block-size", "64K"]);
    let target = t.join("target.img");
    random_file(&target, 5 * MIB, 3);
    restore(&repo, "latest", &target);
    assert_eq!(std::fs::metadata(&target).unwrap().len(), 3 * MIB + 100);
    assert_eq!(sha256_file(&target), sha256_file(&src));
}

#[test]
fn sha256_repository_roundtrip_names_blobs_by_sha256() {
    let t = TestDir::new();
    let src = t.join("src.img");
    let repo = t.join("repo");
    let mut rng = Rng::new(4);
    let size = 6 * MIB + 4321;
    sparse_file(&src, size);
    let block0 = rng.bytes(BS as usize);
    write_at(&src, 0, &block0);
    write_at(&src, BS, &rng.text(2 * MIB as usize));
    write_at(&src, 4 * MIB, &rng.bytes(MIB as usize));
    write_at(&src, size - 4321, &rng.bytes(4321));

    // SHA-256 blob ids exist in plain repositories only (encrypted ones use keyed BLAKE3).
    init_repo(&repo, &["--hash", "sha256", "--no-encryption"]);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo.join("config")).unwrap()).unwrap();
    assert_eq!(config["chunk_hash"], "sha256", "config: {config}");

    let b = backup_json(&src, &repo, &["--block-size", "64K"]);
    assert!(ju64(&b, "/new_chunks") > 0);
    // Block 0 is a blob of its own, named by its SHA-256 (and read back by hand, which checks
    // the name); the pack holding it is named by the BLAKE3 of the pack file, as always.
    let loc = locate_block(&repo, "latest", 0);
    assert_eq!(loc.blob, sha256_bytes(&block0), "block 0's blob id");
    assert_eq!(loc.piece, 0);
    let loc1 = locate_block(&repo, "latest", 1);
    assert_eq!(loc.pack, loc1.pack, "blocks 0 and 1 share a pack");
    assert_eq!(
        blake3_hex(&std::fs::read(&loc.pack_path).unwrap()),
        loc.pack,
        "the pack is named by its BLAKE3"
    );
    let idx = read_index(&repo);
    assert_eq!(read_blob(&repo, &idx, &loc.blob), block0);
    assert_eq!(
        volume_by_hand(&repo, "latest"),
        std::fs::read(&src).unwrap()
    );

    let out = t.join("out.img");
    restore(&repo, "latest", &out);
    assert_eq!(sha256_file(&out), sha256_file(&src));
    volback_ok(&["verify", "--read-data", p(&repo)]).stdout_has(&["no problems"]);

    // Incremental works the same way.
    write_at(&src, 5 * MIB, &rng.bytes(10));
    let b2 = backup_json(&src, &repo, &["--block-size", "64K"]);
    assert_eq!(ju64(&b2, "/new_chunks"), 1, "{b2}");
    let out2 = t.join("out2.img");
    restore(&repo, "latest", &out2);
    assert_eq!(sha256_file(&out2), sha256_file(&src));
}

#[test]
fn identical_volumes_are_deduplicated_across_sources() {
    let t = TestDir::new();
    let a = t.join("a.img");
    let b = t.join("b.img");
    let repo = t.join("repo");
    let mut rng = Rng::new(5);
    sparse_file(&a, 12 * MIB + 999);
    write_at(&a, 0, &rng.bytes(3 * MIB as usize));
    write_at(&a, 5 * MIB, &rng.text(3 * MIB as usize));
    write_at(&a, 12 * MIB, &rng.bytes(999));
    std::fs::copy(&a, &b).unwrap();
    init_repo(&repo, &["--block-size", "64K"]);

    let ra = backup_json(&a, &repo, &[]);
    assert!(ju64(&ra, "/new_chunks") > 0, "{ra}");
    let packs_after_a = pack_files(&repo).len();

    let rb = backup_json(&b, &repo, &[]);
    assert!(rb["parent"].is_null(), "another volume has no parent: {rb}");
    assert_eq!(
        ju64(&rb, "/new_chunks"),
        0,
        "identical content stored again: {rb}"
    );
    assert_eq!(ju64(&rb, "/new_bytes"), 0, "{rb}");
    assert_eq!(
        ju64(&rb, "/stats/deduplicated_blocks"),
        ju64(&rb, "/stats/data_blocks"),
        "{rb}"
    );
    // Not even a tree node is new: the same blocks make the same tree blobs.
    assert_eq!(pack_files(&repo).len(), packs_after_a);

    let out = t.join("out.img");
    restore(&repo, &format!("latest:{}", p(&b)), &out);
    assert_eq!(sha256_file(&out), sha256_file(&a));
    assert_eq!(snapshot_ids(&repo).len(), 2);
}

/// Regression: snapshot times have one-second resolution, and `latest` (and the parent of the
/// next backup) used to be the snapshot with the greatest id among those of the same second.
#[test]
fn latest_is_the_newest_of_quick_successive_backups() {
    let t = TestDir::new();
    let src = t.join("src.img");
    let repo = t.join("repo");
    let mut rng = Rng::new(6);
    random_file(&src, 512 * KIB, 7);
    init_repo(&repo, &["--block-size", "64K"]);
    let mut chain: Vec<String> = Vec::new();
    for i in 0..5 {
        write_at(&src, i * 100_000, &rng.bytes(10));
        let b = backup_json(&src, &repo, &[]);
        assert_eq!(
            b["parent"].as_str(),
            chain.last().map(String::as_str),
            "backup {i} is incremental on the one before: {b}"
        );
        // The first backup stores the 8 blocks (one frame), each later one the block that
        // changed.
        let expected_new = if i == 0 { 8 } else { 1 };
        assert_eq!(ju64(&b, "/new_chunks"), 1, "{b}");
        assert_eq!(ju64(&b, "/new_bytes"), expected_new * 64 * KIB, "{b}");
        chain.push(jstr(&b, "/snapshot").to_string());
        let out = t.join("out.img");
        restore(&repo, "latest", &out);
        assert_eq!(
            sha256_file(&out),
            sha256_file(&src),
            "latest after backup {i}"
        );
    }
    assert_eq!(
        snapshot_ids(&repo),
        chain,
        "snapshots are listed oldest first"
    );
}

/// `restore --only-changed` onto a target that holds an older restore: only the 64 KiB
/// pieces that differ are written, garbage where the snapshot has zeros is zeroed, and the
/// result is the new state exactly. A missing target is restored whole.
#[test]
fn restore_only_changed_writes_only_what_differs() {
    let t = TestDir::new();
    let src = t.join("src.img");
    let repo = t.join("repo");
    let mut rng = Rng::new(80);
    sparse_file(&src, 8 * MIB);
    write_at(&src, 0, &rng.text(3 * MIB as usize));
    write_at(&src, 5 * MIB, &rng.bytes(2 * MIB as usize));
    init_repo(&repo, &[]);
    backup_json(&src, &repo, &[]);
    let out = t.join("out.img");
    volback_ok(&["restore", "--only-changed", p(&repo), "latest", p(&out)])
        .stdout_has(&["5.0 MiB written", "3.0 MiB already up to date"]);
    assert_eq!(sha256_file(&out), sha256_file(&src));

    // The source changes in one place; the target gets garbage where the volume is zero.
    write_at(&src, MIB + 7, b"changed");
    backup_json(&src, &repo, &[]);
    write_at(&out, 4 * MIB + 100, &[0xaa; 1000]);
    // Only the garbage's data range is zeroed (the target's holes are zeros already): how
    // much that is depends on the filesystem's block size, so only "some" is asserted.
    let r = volback_ok(&["restore", "--only-changed", p(&repo), "latest", p(&out)]);
    r.stdout_has(&["64.0 KiB written", "of it zeroed"]);
    assert!(!r.stdout.contains("(0 B of it zeroed)"), "{}", r.stdout);
    assert_eq!(sha256_file(&out), sha256_file(&src));

    // Up to date: nothing written, and --verify reads it all back.
    volback_ok(&[
        "restore",
        "--only-changed",
        "--verify",
        p(&repo),
        "latest",
        p(&out),
    ])
    .stdout_has(&[
        "0 B written",
        "(0 B of it zeroed)",
        "read back and verified",
    ]);
    assert_eq!(sha256_file(&out), sha256_file(&src));
}

/// The same onto a block device (a loop device over a file full of other data): the device
/// ends up holding the snapshot over the volume's size, zeros where the volume has none.
#[test]
fn restore_only_changed_onto_a_device() {
    if !require_root_and_loop() {
        return;
    }
    let t = TestDir::new();
    let src = t.join("src.img");
    let repo = t.join("repo");
    let mut rng = Rng::new(81);
    sparse_file(&src, 6 * MIB);
    write_at(&src, 0, &rng.text(2 * MIB as usize));
    write_at(&src, 4 * MIB, &rng.bytes(MIB as usize));
    init_repo(&repo, &[]);
    backup_json(&src, &repo, &[]);
    // The device: the source's first 2 MiB with one byte changed, then random data.
    let disk = t.join("disk.img");
    let mut old = std::fs::read(&src).unwrap();
    old[300_000] ^= 1;
    old[2 * MIB as usize..].copy_from_slice(&rng.bytes(4 * MIB as usize));
    old.extend(rng.bytes(MIB as usize));
    std::fs::write(&disk, &old).unwrap();
    let lo = Loop::attach(&disk, false);
    volback_ok(&["restore", "--only-changed", p(&repo), "latest", p(&lo.dev)]).stdout_has(&[
        // the changed 64 KiB piece, and the 1 MiB of data at 4 MiB
        "1.1 MiB written",
        "(3.0 MiB of it zeroed)",
    ]);
    drop(lo);
    let got = std::fs::read(&disk).unwrap();
    assert_eq!(&got[..6 * MIB as usize], &std::fs::read(&src).unwrap()[..]);
    assert_eq!(
        &got[6 * MIB as usize..],
        &old[6 * MIB as usize..],
        "past the volume: untouched"
    );
}
