//! Prune on small real repositories (temporary directories).

use super::*;
use crate::progress::Silent;
use crate::repo::InitOptions;
use crate::repo::blob::BlobKind;
use crate::repo::chunks::Encoder;
use crate::repo::format::BlockRef;
use crate::repo::pack::FrameEncoder;
use crate::repo::packer::Packer;
use crate::repo::snapshot::{testing::header, write_tree_snapshot};
use crate::repo::tree::TreeWriter;
use crate::verify::{VerifyOptions, verify};

pub(crate) struct Fx {
    _dir: tempfile::TempDir,
    pub repo: Repository,
}

pub(crate) fn fx() -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::init(
        &dir.path().join("r"),
        &InitOptions {
            pack_size: 1 << 20,
            ..InitOptions::default()
        },
    )
    .unwrap();
    Fx { _dir: dir, repo }
}

/// [`fx`] with its objects sealed (an encrypted repository).
pub(crate) fn fx_sealed() -> Fx {
    let Fx { _dir, repo } = fx();
    Fx {
        _dir,
        repo: repo.encrypted_for_tests(),
    }
}

/// A plain and an encrypted fixture: the tests run on both.
pub(crate) fn fxs() -> [Fx; 2] {
    [fx(), fx_sealed()]
}

/// The 4096-byte content of data blob number `n`.
pub(crate) fn content(n: u32) -> Vec<u8> {
    let mut v = vec![0u8; 4096];
    for (i, b) in v.iter_mut().enumerate() {
        *b = (n as usize * 7919 + i * 31 % 251) as u8 ^ (n >> 8) as u8;
    }
    v[0..4].copy_from_slice(&n.to_le_bytes());
    v
}

/// Stores data blobs `ns`, `per_frame` to a frame, in one new pack; returns their ids.
pub(crate) fn put_blobs(repo: &Repository, ns: &[u32], per_frame: usize) -> Vec<ChunkId> {
    let store = BlobStore::open_writer(repo, &[]).unwrap();
    let packer = Packer::new(repo, store).unwrap();
    let mut enc = FrameEncoder::new(3, repo.sealer()).unwrap();
    let mut ids = Vec::new();
    for group in ns.chunks(per_frame) {
        let mut raw = Vec::new();
        let mut blobs = Vec::new();
        for &n in group {
            let c = content(n);
            let id = repo.sealer().blob_id(&c);
            blobs.push((id, BlobKind::Data, raw.len() as u32, c.len() as u32));
            raw.extend_from_slice(&c);
            ids.push(id);
        }
        let frame = enc.encode(&raw).unwrap();
        packer.add_frame(frame, raw.len() as u32, &blobs).unwrap();
    }
    packer.checkpoint().unwrap();
    ids
}

/// A snapshot whose block i is blob `ids[i]` (4096-byte blocks); its tree in a new pack.
pub(crate) fn snapshot(repo: &Repository, ids: &[ChunkId]) -> String {
    let store = BlobStore::open_writer(repo, &[]).unwrap();
    let packer = Packer::new(repo, store).unwrap();
    let mut w = TreeWriter::new(&packer, ids.len() as u64);
    for id in ids {
        w.push(
            BlockRef::Part {
                blob: *id,
                index: 0,
            },
            1,
        )
        .unwrap();
    }
    let root = w.finish().unwrap();
    packer.checkpoint().unwrap();
    let mut h = header(ids.len() as u64 * 4096, 4096);
    h.time_unix = crate::time::now_unix();
    write_tree_snapshot(repo.backend().as_ref(), &h, root, repo.sealer()).unwrap()
}

pub(crate) fn packs(repo: &Repository) -> Vec<ChunkId> {
    let mut v: Vec<ChunkId> = sweep::list_pack_files(repo, None)
        .unwrap()
        .0
        .into_iter()
        .map(|p| p.0)
        .collect();
    v.sort_by_key(|a| a.0);
    v
}

pub(crate) fn assert_clean(repo: &Repository) {
    let r = verify(
        repo,
        &[],
        &VerifyOptions {
            read_data: true,
            threads: 1,
        },
        &Silent,
    )
    .unwrap();
    assert!(r.problems.is_empty(), "{:#?}", r.problems);
}

/// Reads every block of every snapshot back.
fn assert_readable(repo: &Repository, expected: &[(String, Vec<u32>)]) {
    let store = BlobStore::open(repo).unwrap();
    for (id, ns) in expected {
        let mut snap = repo.open_snapshot(id).unwrap();
        snap.set_blobs(store.clone());
        let mut got = Vec::new();
        snap.for_each_run(|_, r, n| {
            for k in 0..n {
                got.push(r.advance(k));
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(got.len(), ns.len());
        for (r, n) in got.iter().zip(ns) {
            let b =
                crate::repo::blob::BlobSource::blob(&*store, &r.blob().unwrap(), BlobKind::Data)
                    .unwrap();
            assert_eq!(&b[..], &content(*n)[..]);
        }
    }
}

fn prune_default(repo: &Repository) -> PruneReport {
    prune(repo, &PruneOptions::default(), &Silent).unwrap()
}

#[test]
fn fully_dead_packs_are_deleted_and_live_ones_kept() {
    for f in fxs() {
        let a = put_blobs(&f.repo, &[1, 2, 3, 4], 2);
        let _b = put_blobs(&f.repo, &[5, 6, 7, 8], 2);
        let s = snapshot(&f.repo, &a);
        assert_eq!(packs(&f.repo).len(), 3);
        let r = prune_default(&f.repo);
        assert_eq!(r.packs_deleted, 1, "{r:#?}");
        assert_eq!(r.packs_after, 2);
        assert!(r.deferred.is_empty());
        assert_eq!(writers::read_pending(&f.repo).unwrap(), vec![]);
        assert_clean(&f.repo);
        assert_readable(&f.repo, &[(s, vec![1, 2, 3, 4])]);
        // Nothing left to do.
        let r = prune_default(&f.repo);
        assert_eq!((r.packs_deleted, r.packs_repacked), (0, 0), "{r:#?}");
    }
}

#[test]
fn partly_dead_packs_are_repacked() {
    for f in fxs() {
        let ids = put_blobs(&f.repo, &[1, 2, 3, 4, 5, 6, 7, 8], 1);
        let s = snapshot(&f.repo, &ids[..2]);
        let before = packs(&f.repo);
        let r = prune_default(&f.repo);
        assert_eq!(r.packs_repacked, 1, "{r:#?}");
        assert!(r.bytes_repacked > 0);
        let after = packs(&f.repo);
        assert_eq!(after.len(), 2);
        assert!(!after.contains(&before.iter().find(|p| !after.contains(p)).copied().unwrap()));
        assert_clean(&f.repo);
        assert_readable(&f.repo, &[(s, vec![1, 2])]);
        let r = prune_default(&f.repo);
        assert_eq!((r.packs_deleted, r.packs_repacked), (0, 0), "{r:#?}");
    }
}

#[test]
fn dead_blobs_of_a_live_frame_are_dropped_by_a_repack() {
    for f in fxs() {
        // One frame of four blobs, one of them live.
        let ids = put_blobs(&f.repo, &[1, 2, 3, 4], 4);
        let s = snapshot(&f.repo, &ids[2..3]);
        let opts = PruneOptions {
            max_unused_percent: 0.0,
            ..PruneOptions::default()
        };
        let r = prune(&f.repo, &opts, &Silent).unwrap();
        assert_eq!((r.packs_repacked, r.blobs_dead), (1, 3), "{r:#?}");
        let index = sweep::load_index(&f.repo).unwrap();
        assert_eq!(index.entries(), 2, "the live blob and the tree node");
        assert_clean(&f.repo);
        assert_readable(&f.repo, &[(s, vec![3])]);
        let r = prune(&f.repo, &opts, &Silent).unwrap();
        assert_eq!((r.packs_deleted, r.packs_repacked), (0, 0), "{r:#?}");
    }
}

#[test]
fn dry_run_changes_nothing() {
    for f in fxs() {
        let a = put_blobs(&f.repo, &[1, 2], 1);
        put_blobs(&f.repo, &[3, 4], 1);
        snapshot(&f.repo, &a);
        let list = |r: &Repository| {
            let mut v: Vec<_> = walkdir(r.root());
            v.sort();
            v
        };
        let before = list(&f.repo);
        let r = prune(
            &f.repo,
            &PruneOptions {
                dry_run: true,
                ..PruneOptions::default()
            },
            &Silent,
        )
        .unwrap();
        assert!(r.dry_run);
        assert_eq!(r.packs_deleted, 1);
        assert!(r.bytes_reclaimable > 0);
        assert_eq!(list(&f.repo), before);
    }
}

fn walkdir(p: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(p).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(walkdir(&e.path()));
        } else if e.file_name() != "prune.lock" {
            out.push(e.path());
        }
    }
    out
}

#[test]
fn a_second_prune_is_refused() {
    for f in fxs() {
        let _held = lock_prune(&f.repo).unwrap();
        let e = prune(&f.repo, &PruneOptions::default(), &Silent).unwrap_err();
        assert!(matches!(e, Error::Locked { .. }), "{e}");
        assert!(e.to_string().contains("another prune is running"), "{e}");
        assert!(e.to_string().contains("prune.lock"), "{e}");
    }
}

#[test]
fn deletion_waits_for_writers_that_do_not_know_the_record() {
    for f in fxs() {
        let a = put_blobs(&f.repo, &[1, 2], 1);
        let b = put_blobs(&f.repo, &[3, 4], 1);
        snapshot(&f.repo, &a);
        let condemned = packs(&f.repo);
        let (marker, _) = writers::register_writer(&f.repo).unwrap();
        let r = prune_default(&f.repo);
        assert_eq!(r.deferred.len(), 1, "{r:#?}");
        assert_eq!(r.packs_deferred, 1);
        assert_eq!(
            packs(&f.repo),
            condemned,
            "nothing deleted while the writer runs"
        );
        assert_clean(&f.repo);
        // The writer that did not know used a blob of the condemned pack meanwhile.
        let s2 = snapshot(&f.repo, &b[..1]);
        drop(marker);
        let r = prune_default(&f.repo);
        assert!(r.deferred.is_empty(), "{r:#?}");
        assert_eq!(r.packs_rescued, 1, "{r:#?}");
        assert_clean(&f.repo);
        assert_readable(&f.repo, &[(s2, vec![3])]);
    }
}

#[test]
fn unindexed_packs_are_deleted_when_no_writer_runs() {
    for f in fxs() {
        let a = put_blobs(&f.repo, &[1], 1);
        snapshot(&f.repo, &a);
        // A pack written by a writer that died before indexing it.
        let mut w =
            crate::repo::pack::PackWriter::create(f.repo.backend().as_ref(), f.repo.sealer())
                .unwrap();
        let c = content(9);
        let mut enc = FrameEncoder::new(3, f.repo.sealer()).unwrap();
        w.add_frame(
            enc.encode(&c).unwrap(),
            4096,
            &[(f.repo.sealer().blob_id(&c), BlobKind::Data, 0, 4096)],
        )
        .unwrap();
        let (orphan, _) = w.finish().unwrap();
        {
            let (_marker, _) = writers::register_writer(&f.repo).unwrap();
            prune_default(&f.repo);
            assert!(packs(&f.repo).contains(&orphan), "kept while a writer runs");
        }
        let r = prune_default(&f.repo);
        assert_eq!(r.orphans_deleted, 1, "{r:#?}");
        assert!(!packs(&f.repo).contains(&orphan));
        assert_clean(&f.repo);
    }
}

#[test]
fn journals_keep_their_blobs() {
    for f in fxs() {
        let ids = put_blobs(&f.repo, &[1, 2], 1);
        let mut recs = Vec::new();
        crate::repo::format::encode_run(
            &mut recs,
            BlockRef::Part {
                blob: ids[0],
                index: 0,
            },
            1,
        );
        let jh = crate::repo::journal::JournalHeader {
            source: header(4096, 4096).source,
            volume_key: "k".into(),
            block_size: 4096,
            block_count: 1,
            chunk_hash: f.repo.config().chunk_hash,
            parent: None,
            all_blocks: true,
            time: "t".into(),
            time_unix: 0,
            time_nanos: 0,
            tags: vec![],
            source_state: None,
        };
        let mut j = crate::repo::journal::Journal::create(
            f.repo.backend().as_ref(),
            "journals/k.journal",
            &jh,
            f.repo.sealer(),
        )
        .unwrap();
        j.append(0, 1, &Default::default(), &[], &recs).unwrap();
        let live = mark::mark(&f.repo, &*BlobStore::open(&f.repo).unwrap(), &Silent).unwrap();
        assert_eq!(live.journals, 1);
        assert!(live.ids.contains(&ids[0]) && !live.ids.contains(&ids[1]));
    }
}

/// A format 1 repository in `dir` holding three chunk files of one block each (blocks of
/// bytes 1, 2 and 3), named by no snapshot yet; returns it and the chunk ids.
pub(crate) fn v1_repo_with_three_chunks(dir: &std::path::Path) -> (Repository, Vec<ChunkId>) {
    let repo = Repository::init(&dir.join("r"), &InitOptions::v1()).unwrap();
    let bs = repo.config().block_size as usize;
    let mut enc = Encoder::new(3).unwrap();
    let mut ids = Vec::new();
    for n in 0..3u8 {
        let data = vec![n + 1; bs];
        let id = repo.config().chunk_hash.hash(&data);
        repo.chunks().put(&id, &enc.encode(&data)).unwrap();
        ids.push(id);
    }
    (repo, ids)
}

#[test]
fn format_1_prune_deletes_unreferenced_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, ids) = v1_repo_with_three_chunks(dir.path());
    let bs = repo.config().block_size as usize;
    let mut w = crate::repo::snapshot::SnapshotWriter::create(&repo.tmp_dir()).unwrap();
    w.push(BlockRef::Chunk(ids[0]), 1).unwrap();
    w.finish(&header(bs as u64, bs as u32), &repo.snapshots_dir())
        .unwrap();
    let r = prune_default(&repo);
    assert_eq!(r.format, 1);
    assert_eq!((r.packs_before, r.packs_deleted, r.packs_after), (3, 2, 1));
    assert!(repo.chunks().exists(&ids[0]).unwrap());
    assert!(!repo.chunks().exists(&ids[1]).unwrap());
}

/// The state a prune killed after writing its pending record leaves: compacted index, record,
/// old index files still there.
#[test]
fn a_record_left_by_a_killed_prune_is_finished() {
    for f in fxs() {
        let a = put_blobs(&f.repo, &[1, 2], 1);
        put_blobs(&f.repo, &[3, 4], 1);
        let s = snapshot(&f.repo, &a);
        let index = sweep::load_index(&f.repo).unwrap();
        let live = mark::mark(&f.repo, &*BlobStore::open(&f.repo).unwrap(), &Silent).unwrap();
        let p = plan::plan(
            index.tables.iter().map(|(p, e)| (p, &e[..])),
            &live.ids,
            &PlanLimits::default(),
            f.repo.sealer().overhead() as u64,
        );
        assert_eq!(p.condemn.len(), 1);
        let drop: HashSet<ChunkId> = p.condemn.iter().copied().collect();
        let written = sweep::write_compacted(&f.repo, &index.tables, &drop).unwrap();
        let old: Vec<String> = index
            .files
            .iter()
            .filter(|x| !written.contains(x))
            .cloned()
            .collect();
        // Killed here ("compact-index"): old and compacted files side by side.
        assert_clean(&f.repo);
        writers::write_pending(&f.repo, &p.condemn, &old).unwrap();
        // Killed here ("pending-written"): readers still fine.
        assert_clean(&f.repo);
        let r = prune_default(&f.repo);
        assert_eq!(r.packs_deleted, 1, "{r:#?}");
        assert!(writers::read_pending(&f.repo).unwrap().is_empty());
        for o in &old {
            assert!(!f.repo.index_dir().join(o).exists());
        }
        assert_clean(&f.repo);
        assert_readable(&f.repo, &[(s, vec![1, 2])]);
    }
}

#[test]
fn dry_run_can_assume_snapshots_forgotten() {
    for f in fxs() {
        let a = put_blobs(&f.repo, &[1, 2], 1);
        let s = snapshot(&f.repo, &a);
        let r = prune(
            &f.repo,
            &PruneOptions {
                dry_run: true,
                assume_removed: vec![s],
                ..PruneOptions::default()
            },
            &Silent,
        )
        .unwrap();
        assert_eq!(r.packs_deleted, 2, "data and tree packs: {r:#?}");
        assert_eq!(r.snapshots, 0);
    }
}

#[test]
fn a_pack_whose_live_frame_is_damaged_is_kept_as_it_is() {
    for f in fxs() {
        let ids = put_blobs(&f.repo, &[1, 2, 3, 4, 5, 6, 7, 8], 1);
        snapshot(&f.repo, &ids[..2]);
        let index = sweep::load_index(&f.repo).unwrap();
        let (pack, entries) = index
            .tables
            .iter()
            .find(|(_, e)| e.len() == 8)
            .map(|(p, e)| (*p, e.clone()))
            .unwrap();
        let first = entries.iter().find(|e| e.id == ids[0]).unwrap();
        let path = sweep::pack_path(&f.repo, &pack);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[first.frame_offset as usize + 20] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let r = prune_default(&f.repo);
        assert_eq!(r.packs_repacked, 0, "{r:#?}");
        assert!(packs(&f.repo).contains(&pack), "the damaged pack stays");
        // Its other live blob is still readable where it was.
        let store = BlobStore::open(&f.repo).unwrap();
        let b = crate::repo::blob::BlobSource::blob(&*store, &ids[1], BlobKind::Data).unwrap();
        assert_eq!(&b[..], &content(2)[..]);
    }
}
