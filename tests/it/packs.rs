//! Pack chunks (FORMAT.md §3): the blocks a backup stores from one read are compressed
//! together, a later backup stores only the blocks that changed, duplicates inside a volume are
//! stored once, and a snapshot whose slice records disagree with its packs is caught.

use crate::util::*;
use std::path::Path;
use volback::repo::format::BlockRef;

const BS: u64 = 64 * KIB;

/// Text in blocks 0-47 with block 10 repeated as block 20 (same run) and as block 70 (another
/// run), zeros in blocks 30-31, random data in blocks 64-95: two runs of 64 blocks at most.
fn make_source(path: &Path, rng: &mut Rng) -> Vec<u8> {
    let mut data = rng.text(96 * BS as usize);
    let block = |i: u64| (i * BS) as usize..((i + 1) * BS) as usize;
    let ten = data[block(10)].to_vec();
    data[block(20)].copy_from_slice(&ten);
    data[block(30).start..block(31).end].fill(0);
    let random = rng.bytes(32 * BS as usize);
    data[block(64).start..block(95).end].copy_from_slice(&random);
    data[block(70)].copy_from_slice(&ten);
    std::fs::write(path, &data).unwrap();
    data
}

fn pack_of(repo: &Path, index: u64) -> (String, u8) {
    match block_ref(repo, "latest", index) {
        BlockRef::Slice { pack, index, .. } => (pack.to_hex(), index),
        other => panic!("block {index} is not in a pack: {other:?}"),
    }
}

#[test]
fn runs_are_packed_duplicates_stored_once_and_incrementals_store_only_changes() {
    let t = TestDir::new();
    let src = t.join("src.img");
    let repo = t.join("repo");
    let mut rng = Rng::new(70);
    let mut data = make_source(&src, &mut rng);
    init_repo(&repo, &["--block-size", "64K"]);

    // One worker: the first run's pack is stored before the second run is looked at (with
    // several, a repeat in a run processed at the same time may be stored twice).
    let full = backup_json(&src, &repo, &["--threads", "1"]);
    // Two runs (blocks 0-63 and 64-95), one pack each.
    assert_eq!(ju64(&full, "/new_chunks"), 2, "{full}");
    assert_eq!(chunk_files(&repo).len(), 2);
    assert_eq!(ju64(&full, "/stats/zero_blocks"), 2, "{full}");
    // Block 20 repeats block 10 in the same run, block 70 in the next one.
    assert_eq!(ju64(&full, "/stats/deduplicated_blocks"), 2, "{full}");
    let (first, _) = pack_of(&repo, 0);
    assert_eq!(pack_of(&repo, 20), pack_of(&repo, 10));
    assert_eq!(pack_of(&repo, 70), pack_of(&repo, 10));
    assert_eq!(pack_of(&repo, 63).0, first);
    // The slots skip the zero blocks and the repeat: block 32 is the 30th block stored.
    assert_eq!(pack_of(&repo, 32).1, 29);
    let out = t.join("out.img");
    restore(&repo, "latest", &out);
    assert_eq!(std::fs::read(&out).unwrap(), data);
    volback_ok(&["verify", "--read-data", p(&repo)]).stdout_has(&["no problems"]);

    // One block changed: stored alone as a plain chunk, every other block unchanged.
    data[(5 * BS + 100) as usize] ^= 0xff;
    std::fs::write(&src, &data).unwrap();
    let one = backup_json(&src, &repo, &[]);
    assert_eq!(ju64(&one, "/new_chunks"), 1, "{one}");
    assert_eq!(ju64(&one, "/new_bytes"), BS, "{one}");
    assert!(matches!(block_ref(&repo, "latest", 5), BlockRef::Chunk(_)));
    assert_eq!(
        pack_of(&repo, 6).0,
        first,
        "block 6 still in the first pack"
    );
    restore(&repo, "latest", &out);
    assert_eq!(std::fs::read(&out).unwrap(), data);

    // Two blocks of one run, apart: one pack of the two, built from a copy.
    data[(40 * BS) as usize] ^= 1;
    data[(44 * BS) as usize] ^= 1;
    std::fs::write(&src, &data).unwrap();
    let two = backup_json(&src, &repo, &[]);
    assert_eq!(ju64(&two, "/new_chunks"), 1, "{two}");
    assert_eq!(ju64(&two, "/new_bytes"), 2 * BS, "{two}");
    assert_eq!(pack_of(&repo, 40).1, 0);
    assert_eq!(pack_of(&repo, 44), (pack_of(&repo, 40).0, 1));
    restore(&repo, "latest", &out);
    assert_eq!(std::fs::read(&out).unwrap(), data);
    volback_ok(&["verify", "--read-data", p(&repo)]).stdout_has(&["no problems"]);

    // Every snapshot still restores exactly through mount-style random reads too (serve and
    // mount read through the same reader; here `restore` of the first snapshot).
    let ids = snapshot_ids(&repo);
    assert_eq!(ids.len(), 3);
}

#[test]
fn pack_size_zero_stores_one_chunk_per_block() {
    let t = TestDir::new();
    let src = t.join("src.img");
    let repo = t.join("repo");
    let mut rng = Rng::new(71);
    let data = make_source(&src, &mut rng);
    init_repo(&repo, &["--block-size", "64K", "--pack-size", "0"]);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo.join("config")).unwrap()).unwrap();
    assert_eq!(config["pack_size"], 0, "{config}");
    let b = backup_json(&src, &repo, &["--threads", "1"]);
    // 96 blocks, 2 zero, 2 repeats.
    assert_eq!(ju64(&b, "/new_chunks"), 92, "{b}");
    assert!(matches!(block_ref(&repo, "latest", 0), BlockRef::Chunk(_)));
    let out = t.join("out.img");
    restore(&repo, "latest", &out);
    assert_eq!(std::fs::read(&out).unwrap(), data);
    volback_code(&["init", p(&t.join("r2")), "--pack-size", "32M"], 1).stderr_has(&["pack size"]);
}

/// Rewrites the latest snapshot of `repo` with `change` applied to block `index`'s record:
/// a tampered snapshot whose own checksums are right.
fn rewrite_latest(repo: &Path, index: u64, change: impl Fn(BlockRef) -> BlockRef) -> String {
    use volback::repo::snapshot::SnapshotWriter;
    let r = volback::repo::Repository::open(repo).unwrap();
    let id = r.resolve("latest").unwrap();
    let snap = r.open_snapshot(&id).unwrap();
    let mut header = snap.header().clone();
    header.tags = vec!["tampered".into()];
    let mut w = SnapshotWriter::create(&repo.join("tmp")).unwrap();
    let mut i = 0u64;
    snap.for_each_run(|_, b, n| {
        for _ in 0..n {
            w.push(if i == index { change(b) } else { b }, 1)?;
            i += 1;
        }
        Ok(())
    })
    .unwrap();
    drop(snap);
    let new = w.finish(&header, &repo.join("snapshots")).unwrap();
    drop(r);
    std::fs::remove_file(repo.join("snapshots").join(&id)).unwrap();
    new
}

#[test]
fn slices_that_disagree_with_their_pack_are_reported() {
    let t = TestDir::new();
    let src = t.join("src.img");
    let repo = t.join("repo");
    let mut rng = Rng::new(72);
    make_source(&src, &mut rng);
    init_repo(&repo, &["--block-size", "64K"]);
    backup_json(&src, &repo, &[]);
    let out = t.join("out.img");

    // Block 3 claims the content of slot 4: the pack itself is sound, the slice is not.
    let bad = rewrite_latest(&repo, 3, |b| match b {
        BlockRef::Slice { hash, pack, .. } => BlockRef::Slice {
            hash,
            pack,
            index: 4,
        },
        other => panic!("{other:?}"),
    });
    let r = volback_code(&["verify", "--read-data", p(&repo)], 1);
    r.stdout_has(&[
        "slice 4 hashes to",
        &format!("affects snapshot {}", &bad[..12]),
    ]);
    // A restore checks every slice against the snapshot's hash before writing it.
    volback_code(&["restore", p(&repo), "latest", p(&out)], 1)
        .stderr_has(&["slice 4 hashes to", "the snapshot says"]);
    // Without --read-data, verify only checks that the pack exists.
    volback_ok(&["verify", p(&repo)]);

    // A slot past the end of the pack: a clear error, no panic.
    rewrite_latest(&repo, 3, |b| match b {
        BlockRef::Slice { hash, pack, .. } => BlockRef::Slice {
            hash,
            pack,
            index: 63,
        },
        other => panic!("{other:?}"),
    });
    volback_code(&["restore", p(&repo), "latest", p(&out)], 1)
        .stderr_has(&["too few for slice 63"]);
    volback_code(&["verify", "--read-data", p(&repo)], 1).stdout_has(&["too few for slice 63"]);
}
