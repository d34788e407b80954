//! Mark: the live set, every blob (format 2) or chunk (format 1) that a snapshot or a journal
//! of an unfinished backup names.
//!
//! Format 2: each snapshot's tree is walked with [`walk_tree`]; tree nodes already seen (shared
//! by snapshots: an incremental stores only the leaves that changed) are not walked again.
//! Tree nodes are live blobs too. Every journal's batches add the blobs of their PART records.
//! Format 1: the chunk ids (chunks and packs of slices) of every snapshot and journal.
//!
//! Any snapshot or journal that cannot be read is an error: prune never deletes on a guess.

use crate::error::{Error, Result};
use crate::hash::ChunkId;
use crate::progress::Progress;
use crate::repo::Repository;
use crate::repo::blob::{BlobKind, BlobSource};
use crate::repo::format::{BlockRef, decode_records};
use crate::repo::journal::Journal;
use crate::repo::snapshot::SnapshotFile;
use crate::repo::tree::walk_tree;
use std::collections::HashSet;
use std::sync::Arc;

/// What the mark found.
#[derive(Debug, Default)]
pub struct LiveSet {
    /// Live blob ids (format 2: data and tree blobs) or chunk ids (format 1).
    pub ids: HashSet<ChunkId>,
    pub snapshots: usize,
    pub journals: usize,
}

/// Keys of the journals of `repo` (`journals/*.journal`), sorted.
pub fn journal_paths(repo: &Repository) -> Result<Vec<String>> {
    let mut out = Vec::new();
    repo.backend().list("journals", &mut |m| {
        if m.name.ends_with(".journal") {
            out.push(m.name);
        }
        Ok(())
    })?;
    out.sort();
    Ok(out)
}

/// Opens every snapshot of `repo` (sorted by id); the first unreadable one is an error.
pub fn open_snapshots(repo: &Repository) -> Result<Vec<SnapshotFile>> {
    let mut ids = repo.snapshot_ids()?;
    ids.sort();
    ids.iter().map(|id| repo.open_snapshot(id)).collect()
}

/// Adds to `live` the ids one snapshot names: its tree (nodes in `seen_nodes` are skipped,
/// new ones added there and to `live`) or, for a snapshot with segments, its chunks and blobs.
pub fn mark_snapshot(
    snap: &SnapshotFile,
    src: &dyn BlobSource,
    seen_nodes: &mut HashSet<ChunkId>,
    live: &mut HashSet<ChunkId>,
) -> Result<()> {
    match snap.tree() {
        Some(root) => walk_tree(src, &root, &mut |id, kind| match kind {
            BlobKind::Tree => {
                if seen_nodes.insert(*id) {
                    live.insert(*id);
                    true
                } else {
                    false
                }
            }
            BlobKind::Data => {
                live.insert(*id);
                false
            }
        }),
        None => snap.for_each_run(|_, r, _| {
            if let Some(id) = stored_id(&r) {
                live.insert(id);
            }
            Ok(())
        }),
    }
}

/// The stored object a block reference needs: a blob (format 2) or a chunk file (format 1).
fn stored_id(r: &BlockRef) -> Option<ChunkId> {
    r.blob().or_else(|| r.chunk())
}

/// Adds to `live` every id the valid batches of the journal at `path` of `repo` name.
pub fn mark_journal(repo: &Repository, name: &str, live: &mut HashSet<ChunkId>) -> Result<()> {
    let path = repo.backend().display_path(name);
    Journal::read_batches(repo.backend().as_ref(), name, repo.sealer(), |_, batch| {
        decode_records(&batch.records, batch.block_count, |r, _| {
            if let Some(id) = stored_id(&r) {
                live.insert(id);
            }
        })
        .map_err(|e| {
            Error::corrupt(
                format!("journal batch at block {}", batch.first_block),
                &path,
                String::from(e),
            )
        })
    })?;
    Ok(())
}

/// The live set of `repo`: every snapshot and every journal. Tree blobs are read through
/// `src`. Progress: phase "mark", measured in snapshot bytes.
pub fn mark(repo: &Repository, src: &dyn BlobSource, progress: &dyn Progress) -> Result<LiveSet> {
    mark_except(repo, src, progress, &HashSet::new())
}

/// [`mark`], as if the snapshots `skip` (full ids) were gone (a dry run after a dry-run
/// `forget`).
pub fn mark_except(
    repo: &Repository,
    src: &dyn BlobSource,
    progress: &dyn Progress,
    skip: &HashSet<String>,
) -> Result<LiveSet> {
    let mut snaps = open_snapshots(repo)?;
    snaps.retain(|s| !skip.contains(s.id()));
    let total: u64 = snaps.iter().map(|s| s.header().source.size).sum();
    progress.start("mark", total);
    let mut set = LiveSet::default();
    let mut seen_nodes = HashSet::new();
    for snap in &snaps {
        mark_snapshot(snap, src, &mut seen_nodes, &mut set.ids)
            .map_err(|e| in_snapshot(snap.id(), e))?;
        set.snapshots += 1;
        progress.advance(snap.header().source.size);
    }
    progress.finish();
    for path in journal_paths(repo)? {
        mark_journal(repo, &path, &mut set.ids)?;
        set.journals += 1;
    }
    Ok(set)
}

/// Wraps an error met while reading snapshot `id` so that the message names it.
fn in_snapshot(id: &str, e: Error) -> Error {
    match e {
        Error::Corrupt { what, path, detail } => Error::Corrupt {
            what: format!("{what} (snapshot {})", &id[..12.min(id.len())]),
            path,
            detail,
        },
        e => e,
    }
}

/// A blob source for format 1, where snapshots name no blobs: asking it is a bug of the
/// command named by the field.
pub struct NoBlobs(pub &'static str);

impl BlobSource for NoBlobs {
    fn blob(&self, id: &ChunkId, _: BlobKind) -> Result<Arc<Vec<u8>>> {
        Err(Error::internal(
            self.0,
            format!("format 1 snapshot names blob {id}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::HashAlgorithm;
    use crate::repo::blob::BlobSink;
    use crate::repo::tree::TreeWriter;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    /// Blobs in memory.
    #[derive(Default)]
    struct Mem(Mutex<HashMap<ChunkId, Arc<Vec<u8>>>>);

    impl BlobSource for Mem {
        fn blob(&self, id: &ChunkId, _: BlobKind) -> Result<Arc<Vec<u8>>> {
            self.0
                .lock()
                .unwrap()
                .get(id)
                .cloned()
                .ok_or_else(|| Error::internal("test", format!("no blob {id}")))
        }
    }

    impl BlobSink for Mem {
        fn put_blob(&self, _: BlobKind, content: &[u8]) -> Result<ChunkId> {
            let id = HashAlgorithm::Blake3.hash(content);
            self.0
                .lock()
                .unwrap()
                .insert(id, Arc::new(content.to_vec()));
            Ok(id)
        }
    }

    fn blob(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    /// A tree of `blocks` blocks: block i is piece 0 of blob `refs(i)` (or zero).
    fn tree(
        mem: &Mem,
        blocks: u64,
        refs: impl Fn(u64) -> Option<u8>,
    ) -> crate::repo::tree::TreeRoot {
        let mut w = TreeWriter::new(mem, blocks);
        for i in 0..blocks {
            match refs(i) {
                Some(n) => w
                    .push(
                        BlockRef::Part {
                            blob: blob(n),
                            index: 0,
                        },
                        1,
                    )
                    .unwrap(),
                None => w.push(BlockRef::Zero, 1).unwrap(),
            }
        }
        w.finish().unwrap()
    }

    #[test]
    fn walk_marks_data_and_tree_blobs_and_skips_seen_nodes() {
        let mem = Mem::default();
        let blocks = crate::repo::tree::LEAF_BLOCKS * 3;
        // Two trees sharing their first two leaves; the third leaf differs.
        let a = tree(&mem, blocks, |i| Some((i / 20000) as u8 + 1));
        let b = tree(&mem, blocks, |i| {
            (i < 2 * crate::repo::tree::LEAF_BLOCKS).then(|| (i / 20000) as u8 + 1)
        });
        let mut live = HashSet::new();
        let mut seen = HashSet::new();
        let mut visits = 0usize;
        walk_tree(&mem, &a, &mut |id, kind| {
            visits += 1;
            live.insert(*id);
            kind == BlobKind::Tree && seen.insert(*id)
        })
        .unwrap();
        for n in 1..=3u8 {
            assert!(live.contains(&blob(n)), "blob {n}");
        }
        assert!(live.contains(&a.root));
        let before = seen.len();
        let mut walked_b = HashSet::new();
        walk_tree(&mem, &b, &mut |id, kind| {
            walked_b.insert(*id);
            kind == BlobKind::Tree && seen.insert(*id)
        })
        .unwrap();
        // b's root and its third leaf are new; its shared leaves are not descended into.
        assert_eq!(seen.len(), before + 2);
        assert!(!walked_b.contains(&blob(1)), "shared leaf was walked again");
        assert!(visits > 0);
    }
}
