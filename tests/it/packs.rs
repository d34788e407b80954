//! Blobs, frames and packs (FORMAT.md §F2): a backup stores the blocks it reads as
//! content-defined blobs compressed together in frames inside pack files, duplicates inside a
//! volume are stored once, an incremental stores only the blobs (and tree leaves) that
//! changed, everything on disk follows the documented layout (read here by hand), and an
//! index that disagrees with its packs is caught.

use crate::util::*;
use std::collections::BTreeSet;
use std::path::Path;

/// Blocks of 4 KiB (the format-2 default), in 8 MiB: text in 0 .. 6 MiB with the MiB at
/// 1 MiB repeated at 4 MiB, zeros in 2.5 .. 3 MiB, random data in 6 .. 8 MiB.
fn make_source(path: &Path, rng: &mut Rng) -> Vec<u8> {
    let m = MIB as usize;
    let mut data = rng.text(6 * m);
    let repeat = data[m..2 * m].to_vec();
    data[4 * m..5 * m].copy_from_slice(&repeat);
    data[5 * m / 2..3 * m].fill(0);
    data.extend(rng.bytes(2 * m));
    std::fs::write(path, &data).unwrap();
    data
}

/// Every pack file is named by the BLAKE3 of its content, its table is what the index
/// says, and every indexed pack exists.
fn assert_packs_match_the_index(repo: &Path) {
    let idx = read_index(repo);
    let on_disk: BTreeSet<String> = pack_files(repo).iter().map(|p| pack_id(p)).collect();
    for (id, entries) in &idx.packs {
        assert!(on_disk.contains(id), "indexed pack {id} does not exist");
        let path = pack_path(repo, id);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&blake3_hex(&bytes), id, "pack named by its BLAKE3");
        assert_eq!(&read_pack_table(&path), entries, "table of {id} as indexed");
        for e in entries {
            assert!(e.frame_offset >= 16 && e.len >= 1, "{e:?}");
            let raw = read_frame(&path, e);
            assert!(e.offset + e.len <= raw.len() as u64, "{e:?}");
            if e.kind == 0 {
                assert!(raw.len() as u64 <= MIB, "data frames hold at most 1 MiB");
            }
        }
    }
}

#[test]
fn blobs_are_frames_in_packs_as_documented_and_duplicates_stored_once() {
    let t = TestDir::new();
    let src = t.join("src.img");
    let repo = t.join("repo");
    let mut rng = Rng::new(70);
    let mut data = make_source(&src, &mut rng);
    // Plain: the test checks the format-2 layout byte by byte.
    init_repo(&repo, &["--no-encryption"]);
    let config = repo_config(&repo);
    assert_eq!(config["version"], 2, "{config}");
    assert_eq!(ju64(&config, "/block_size"), 4096, "{config}");
    assert_eq!(ju64(&config, "/pack_size"), 16 * MIB, "{config}");
    assert!(!repo.join("chunks").exists(), "format 2 has no chunks/");
    let bs = 4096;

    // One worker: the first copy of the repeated MiB is stored before the second is looked
    // at (with several, two copies processed at the same time may be stored twice).
    let full = backup_json(&src, &repo, &["--threads", "1"]);
    assert_eq!(ju64(&full, "/stats/zero_blocks"), MIB / 2 / bs, "{full}");
    // The repeated MiB (256 blocks) is cut the same way from its first content-defined cut
    // on: most of it is deduplicated.
    let dedup = ju64(&full, "/stats/deduplicated_blocks");
    assert!(dedup >= 128, "{dedup} blocks deduplicated: {full}");
    assert!(
        ju64(&full, "/new_bytes") <= 8 * MIB - MIB / 2 - dedup * bs,
        "{full}"
    );
    let out = t.join("out.img");
    restore(&repo, "latest", &out);
    assert_eq!(std::fs::read(&out).unwrap(), data);
    // The same volume read by hand from the tree, the index and the packs.
    assert_eq!(volume_by_hand(&repo, "latest"), data);
    assert_packs_match_the_index(&repo);
    let map = block_map(&repo, "latest");
    assert_eq!(map.block_count, 2048);
    assert_eq!(map.block(640), Blk::Zero, "block 640 is in the zero range");
    // Blobs are whole blocks, at most 256 KiB.
    let idx = read_index(&repo);
    for b in map.data_blobs() {
        let len = idx.locations(&b)[0].1.len;
        assert!(
            len.is_multiple_of(bs) && len <= 256 * KIB,
            "blob {b} of {len} bytes"
        );
    }
    volback_ok(&["verify", "--read-data", p(&repo)]).stdout_has(&["no problems"]);

    // One byte changed: the blob holding it is stored again, every other block unchanged.
    data[(5 * bs + 100) as usize] ^= 0xff;
    std::fs::write(&src, &data).unwrap();
    let one = backup_json(&src, &repo, &[]);
    assert!(ju64(&one, "/new_chunks") >= 1, "{one}");
    assert!(ju64(&one, "/new_bytes") <= 256 * KIB, "{one}");
    let after = block_map(&repo, "latest");
    assert_ne!(after.block(5), map.block(5));
    for i in (100..2048).step_by(7) {
        assert_eq!(after.block(i), map.block(i), "block {i} changed");
    }
    restore(&repo, "latest", &out);
    assert_eq!(std::fs::read(&out).unwrap(), data);
    assert_eq!(volume_by_hand(&repo, "latest"), data);
    volback_ok(&["verify", "--read-data", p(&repo)]).stdout_has(&["no problems"]);
    assert_packs_match_the_index(&repo);
    assert_eq!(snapshot_ids(&repo).len(), 2);
}

/// A volume of more than one tree leaf (16,384 blocks): an incremental that changes one
/// block writes a new leaf for that block's range and a new root, and keeps the other
/// leaves as they were (the same blobs).
#[test]
fn an_incremental_stores_only_the_tree_leaves_that_changed() {
    let t = TestDir::new();
    let src = t.join("src.img");
    let repo = t.join("repo");
    let mut rng = Rng::new(73);
    // 160 MiB: 40,960 blocks of 4 KiB, three leaves under one root; data in each leaf.
    sparse_file(&src, 160 * MIB);
    for at in [0, 70 * MIB, 140 * MIB] {
        write_at(&src, at, &rng.bytes(MIB as usize));
    }
    init_repo(&repo, &[]);
    backup_json(&src, &repo, &[]);
    let before = block_map(&repo, "latest");
    assert_eq!(before.tree_blobs.len(), 4, "a root and three leaves");
    write_at(&src, 70 * MIB + 5000, b"changed");
    let incr = backup_json(&src, &repo, &[]);
    assert!(ju64(&incr, "/new_bytes") <= 256 * KIB, "{incr}");
    let after = block_map(&repo, "latest");
    assert_ne!(after.tree_blobs[0], before.tree_blobs[0], "new root");
    assert_eq!(after.tree_blobs[1], before.tree_blobs[1], "leaf 0 kept");
    assert_ne!(after.tree_blobs[2], before.tree_blobs[2], "leaf 1 changed");
    assert_eq!(after.tree_blobs[3], before.tree_blobs[3], "leaf 2 kept");
    let out = t.join("out.img");
    restore(&repo, "latest", &out);
    assert_eq!(sha256_file(&out), sha256_file(&src));
}

#[test]
fn pack_size_bounds_the_packs() {
    let t = TestDir::new();
    let src = t.join("src.img");
    let repo = t.join("repo");
    random_file(&src, 8 * MIB, 71);
    for bad in ["0", "256M"] {
        volback_code(&["init", p(&t.join("r2")), "--pack-size", bad], 1).stderr_has(&["pack size"]);
    }
    init_repo(&repo, &["--pack-size", "1M"]);
    assert_eq!(ju64(&repo_config(&repo), "/pack_size"), MIB);
    backup_json(&src, &repo, &[]);
    let packs = pack_files(&repo);
    assert!(packs.len() >= 4, "{} packs for 8 MiB", packs.len());
    for pk in &packs {
        // A pack is finished once it reaches the pack size: at most one frame (1 MiB of data)
        // more, and its table.
        let len = std::fs::metadata(pk).unwrap().len();
        assert!(len <= 2 * MIB + 64 * KIB, "{} is {len} bytes", pk.display());
    }
    assert_packs_match_the_index(&repo);
    let out = t.join("out.img");
    restore(&repo, "latest", &out);
    assert_eq!(sha256_file(&out), sha256_file(&src));
}

/// An index whose entry points to other bytes than the blob's (the pack itself is sound,
/// the index lies) is caught by every reader by the blob's hash; an entry past the end of
/// its frame is a clear error, not a panic.
#[test]
fn index_entries_that_disagree_with_their_pack_are_reported() {
    let t = TestDir::new();
    let src = t.join("src.img");
    let repo = t.join("repo");
    let mut rng = Rng::new(72);
    std::fs::write(&src, rng.text(2 * MIB as usize)).unwrap();
    // Plain: the test writes index files by hand.
    init_repo(&repo, &["--block-size", "64K", "--no-encryption"]);
    let snap = jstr(&backup_json(&src, &repo, &[]), "/snapshot").to_string();
    let out = t.join("out.img");
    let loc = locate_block(&repo, &snap, 3);
    let original = read_index(&repo).packs;

    // Block 3's blob claims the bytes of the blob after it in the same frame.
    let mut packs = original.clone();
    let e = packs
        .get_mut(&loc.pack)
        .unwrap()
        .iter_mut()
        .find(|e| e.id == loc.blob)
        .unwrap();
    e.offset += 64 * KIB;
    replace_index(&repo, &packs);
    let r = volback_code(&["restore", p(&repo), "latest", p(&out)], 1);
    r.stderr_has(&[&loc.pack[..12]]);
    assert!(!out.exists());
    let lying = packs;

    // A blob past the end of its frame.
    let mut packs = original.clone();
    let e = packs
        .get_mut(&loc.pack)
        .unwrap()
        .iter_mut()
        .find(|e| e.id == loc.blob)
        .unwrap();
    e.offset = 15 * MIB;
    replace_index(&repo, &packs);
    volback_code(&["restore", p(&repo), "latest", p(&out)], 1).stderr_has(&[&loc.pack[..12]]);

    // The true index again: all is well.
    replace_index(&repo, &original);
    restore(&repo, "latest", &out);
    assert_eq!(sha256_file(&out), sha256_file(&src));
    volback_ok(&["verify", "--read-data", p(&repo)]).stdout_has(&["no problems"]);

    // Reading the data finds the lying entry (last: verify may set the pack aside).
    replace_index(&repo, &lying);
    volback_code(&["verify", "--read-data", p(&repo)], 1);
}
