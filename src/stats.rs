//! Repository statistics: what is stored, what a snapshot uses, what a prune would free.
//!
//! Format 2: pack files and their bytes, indexed blobs, the live set (every snapshot and
//! journal) and the dry-run plan of a prune with default options. For one snapshot: its
//! logical size, the blobs it references (raw bytes, and stored bytes: each blob's share of
//! its compressed frame), and those only it references (no other snapshot or journal): what
//! forgetting it would let a prune free. Format 1: the same over chunk files (stored sizes).

use crate::error::{Error, Result};
use crate::hash::ChunkId;
use crate::progress::Progress;
use crate::prune::{mark, plan, sweep};
use crate::repo::Repository;
use crate::repo::blob::BlobSource;
use crate::repo::blobs::BlobStore;
use crate::repo::writers;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Statistics of a repository.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatsReport {
    /// Repository format (1: chunk files, 2: packs).
    pub format: u32,
    pub snapshots: usize,
    pub journals: usize,
    /// Pack files (format 1: chunk files) and their total bytes.
    pub packs: u64,
    pub stored_bytes: u64,
    /// Indexed blobs (format 1: chunk files).
    pub blobs: u64,
    pub index_files: u64,
    /// Prune records waiting for running backups.
    pub pending_records: u64,
    pub live_blobs: u64,
    pub dead_blobs: u64,
    /// Bytes of packs no snapshot or journal needs (whole dead frames).
    pub dead_bytes: u64,
    /// What a prune with default options would free now.
    pub reclaimable_bytes: u64,
    /// The snapshot asked about.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotUsage>,
}

/// What one snapshot uses.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SnapshotUsage {
    pub id: String,
    /// Size of the backed-up volume.
    pub logical_size: u64,
    /// Blobs (data and tree; format 1: chunk files) it references.
    pub blobs: u64,
    /// Their uncompressed bytes (format 1: stored bytes).
    pub referenced_bytes: u64,
    /// Their stored bytes (each blob's share of its frame).
    pub referenced_stored_bytes: u64,
    /// Blobs no other snapshot or journal references, their raw and stored bytes.
    pub unique_blobs: u64,
    pub unique_bytes: u64,
    pub unique_stored_bytes: u64,
}

/// Statistics of `repo`, and of snapshot `snapshot` (a full id) when given.
pub fn stats(
    repo: &Repository,
    snapshot: Option<&str>,
    progress: &dyn Progress,
) -> Result<StatsReport> {
    match repo.format_version() {
        1 => stats_v1(repo, snapshot, progress),
        _ => stats_v2(repo, snapshot, progress),
    }
}

/// The usage of snapshot `id`: every blob it names counted with `size_of` (raw and stored
/// bytes), and the blobs no other snapshot or journal names counted again as unique.
fn snapshot_usage(
    repo: &Repository,
    src: &dyn BlobSource,
    id: &str,
    size_of: impl Fn(&ChunkId) -> (u64, u64),
) -> Result<SnapshotUsage> {
    let (own, others, size) = split_mark(repo, src, id)?;
    let mut u = SnapshotUsage {
        id: id.to_string(),
        logical_size: size,
        ..SnapshotUsage::default()
    };
    for b in &own {
        let (raw, stored) = size_of(b);
        u.blobs += 1;
        u.referenced_bytes += raw;
        u.referenced_stored_bytes += stored;
        if !others.contains(b) {
            u.unique_blobs += 1;
            u.unique_bytes += raw;
            u.unique_stored_bytes += stored;
        }
    }
    Ok(u)
}

/// Live sets of `snapshot` and of everything else (other snapshots and journals).
fn split_mark(
    repo: &Repository,
    src: &dyn BlobSource,
    snapshot: &str,
) -> Result<(HashSet<ChunkId>, HashSet<ChunkId>, u64)> {
    let snaps = mark::open_snapshots(repo)?;
    let mut own = HashSet::new();
    let mut others = HashSet::new();
    let mut seen_own = HashSet::new();
    let mut seen_others = HashSet::new();
    let mut size = None;
    for s in &snaps {
        if s.id() == snapshot {
            size = Some(s.header().source.size);
            mark::mark_snapshot(s, src, &mut seen_own, &mut own)?;
        } else {
            mark::mark_snapshot(s, src, &mut seen_others, &mut others)?;
        }
    }
    for p in mark::journal_paths(repo)? {
        mark::mark_journal(repo, &p, &mut others)?;
    }
    let size = size.ok_or_else(|| Error::SnapshotNotFound {
        selector: snapshot.into(),
    })?;
    Ok((own, others, size))
}

fn stats_v2(
    repo: &Repository,
    snapshot: Option<&str>,
    progress: &dyn Progress,
) -> Result<StatsReport> {
    let (packs, _) = sweep::list_pack_files(repo, None)?;
    let pending = writers::read_pending(repo)?;
    let pending_packs: HashSet<ChunkId> = pending.iter().flat_map(|r| r.packs.clone()).collect();
    let mut index = sweep::load_index(repo)?;
    index.tables.retain(|p, _| !pending_packs.contains(p));
    let store: Arc<BlobStore> = BlobStore::open(repo)?;
    let live = mark::mark(repo, &*store, progress)?;
    let plan = plan::plan(
        index.tables.iter().map(|(p, e)| (p, &e[..])),
        &live.ids,
        &plan::PlanLimits::default(),
        repo.sealer().overhead() as u64,
    );
    let mut r = StatsReport {
        format: repo.format_version(),
        snapshots: live.snapshots,
        journals: live.journals,
        packs: packs.len() as u64,
        stored_bytes: packs.iter().map(|p| p.1).sum(),
        blobs: index.entries() as u64,
        index_files: index.files.len() as u64,
        pending_records: pending.len() as u64,
        live_blobs: plan.live_blobs,
        dead_blobs: plan.dead_blobs,
        dead_bytes: plan.dead_bytes,
        reclaimable_bytes: plan.reclaimed_bytes(),
        snapshot: None,
    };
    drop(live);
    if let Some(id) = snapshot {
        // Raw length and stored share of every indexed blob (first location).
        let mut sizes: HashMap<ChunkId, (u64, u64)> = HashMap::new();
        for entries in index.tables.values() {
            for (_, (frame_len, idx)) in plan::frames(entries) {
                let raw_total: u64 = idx.iter().map(|&i| u64::from(entries[i].raw_len)).sum();
                for &i in &idx {
                    let raw = u64::from(entries[i].raw_len);
                    let stored = u64::from(frame_len) * raw / raw_total.max(1);
                    sizes.entry(entries[i].id).or_insert((raw, stored));
                }
            }
        }
        let size_of = |b: &ChunkId| sizes.get(b).copied().unwrap_or((0, 0));
        r.snapshot = Some(snapshot_usage(repo, &*store, id, size_of)?);
    }
    Ok(r)
}

fn stats_v1(
    repo: &Repository,
    snapshot: Option<&str>,
    progress: &dyn Progress,
) -> Result<StatsReport> {
    let live = mark::mark(repo, &mark::NoBlobs("stats"), progress)?;
    let mut sizes: HashMap<ChunkId, u64> = HashMap::new();
    let dir = repo.chunks().dir().to_path_buf();
    for i in 0..=255u8 {
        let d = dir.join(format!("{i:02x}"));
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = ChunkId::from_hex(&name).filter(|_| name.len() == 64) {
                sizes.insert(id, e.metadata().map(|m| m.len()).unwrap_or(0));
            }
        }
    }
    let mut r = StatsReport {
        format: 1,
        snapshots: live.snapshots,
        journals: live.journals,
        packs: sizes.len() as u64,
        stored_bytes: sizes.values().sum(),
        blobs: sizes.len() as u64,
        ..StatsReport::default()
    };
    for (id, len) in &sizes {
        if live.ids.contains(id) {
            r.live_blobs += 1;
        } else {
            r.dead_blobs += 1;
            r.dead_bytes += len;
        }
    }
    r.reclaimable_bytes = r.dead_bytes;
    if let Some(id) = snapshot {
        // A format 1 chunk is stored whole: its raw and stored sizes are its file's.
        let size_of = |c: &ChunkId| {
            let len = sizes.get(c).copied().unwrap_or(0);
            (len, len)
        };
        r.snapshot = Some(snapshot_usage(repo, &mark::NoBlobs("stats"), id, size_of)?);
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::Silent;
    use crate::prune::tests::{fx, put_blobs, snapshot};

    #[test]
    fn shared_and_unique_blobs_of_a_snapshot() {
        let f = fx();
        let ids = put_blobs(&f.repo, &[1, 2, 3, 4], 1);
        put_blobs(&f.repo, &[9], 1);
        let s1 = snapshot(&f.repo, &ids[..3]);
        let _s2 = snapshot(&f.repo, &ids[1..]);
        let r = stats(&f.repo, None, &Silent).unwrap();
        assert_eq!(r.format, 2);
        assert_eq!(r.snapshots, 2);
        assert_eq!(r.packs, 4);
        assert!(r.stored_bytes > 0);
        assert_eq!(r.dead_blobs, 1);
        assert!(r.reclaimable_bytes > 0, "the pack of blob 9 is dead");
        let r = stats(&f.repo, Some(&s1), &Silent).unwrap();
        let u = r.snapshot.unwrap();
        assert_eq!(u.logical_size, 3 * 4096);
        // Three data blobs and one tree node (a leaf root); blob 1 and the root only here.
        assert_eq!(u.blobs, 4);
        assert_eq!(u.unique_blobs, 2);
        assert!(u.referenced_bytes >= 3 * 4096);
        assert!(u.unique_stored_bytes > 0 && u.unique_stored_bytes <= u.referenced_stored_bytes);
        let e = stats(&f.repo, Some(&"0".repeat(64)), &Silent).unwrap_err();
        assert!(matches!(e, Error::SnapshotNotFound { .. }), "{e}");
    }
}

#[cfg(test)]
mod tests_v1 {
    use super::*;
    use crate::progress::Silent;
    use crate::repo::format::BlockRef;
    use crate::repo::snapshot::{SnapshotWriter, testing::header};

    #[test]
    fn format_1_counts_chunk_files() {
        let dir = tempfile::tempdir().unwrap();
        let (repo, ids) = crate::prune::tests::v1_repo_with_three_chunks(dir.path());
        let bs = repo.config().block_size as usize;
        let mut w = SnapshotWriter::create(&repo.tmp_dir()).unwrap();
        w.push(BlockRef::Chunk(ids[0]), 1).unwrap();
        w.push(BlockRef::Chunk(ids[1]), 1).unwrap();
        let s = w
            .finish(&header(2 * bs as u64, bs as u32), &repo.snapshots_dir())
            .unwrap();
        let r = stats(&repo, Some(&s), &Silent).unwrap();
        assert_eq!(
            (r.format, r.packs, r.live_blobs, r.dead_blobs),
            (1, 3, 2, 1)
        );
        assert!(r.reclaimable_bytes > 0);
        let u = r.snapshot.unwrap();
        assert_eq!((u.blobs, u.unique_blobs), (2, 2));
    }
}
