//! Sweep: index compaction, pending records, deletion of condemned packs, and crash leftovers.
//!
//! Order of durable steps (each deletion after what replaces it is durable):
//! 1. the compacted index files (everything kept) are written durably;
//! 2. the pending record `{packs: condemned, index: old index files}` is written durably;
//! 3. the old index files are deleted;
//! 4. once every live writer's marker knows the record: re-mark; each condemned pack holding
//!    a live blob with no other indexed location is rescued (an index file names it again),
//!    the others are deleted; then the record is removed.
//!
//! A crash between any two steps leaves a valid repository: before 2, both the old and the
//! compacted index files name the kept packs (a duplicate is harmless) and nothing is
//! condemned; after 2, the next prune finishes the record (3 and 4 are idempotent).

use super::AbortPoint;
use crate::error::{Error, IoContext, Result};
use crate::hash::ChunkId;
use crate::repo::Repository;
use crate::repo::backend::{self, WriteBackend};
use crate::repo::blob::BlobEntry;
use crate::repo::fsio;
use crate::repo::index::{IndexFile, list_index_files};
use crate::repo::pack::read_pack_table;
use crate::repo::writers::{self, PendingRecord, WriterInfo};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Most blob entries per compacted index file (52 bytes each: about 200 MiB).
const MAX_ENTRIES_PER_FILE: usize = 4 << 20;

/// The index files of a repository as read by prune.
#[derive(Debug, Default)]
pub struct IndexState {
    /// Ids of the index files read.
    pub files: Vec<String>,
    /// Every indexed pack with its entries (a pack named by several files: the first one).
    pub tables: HashMap<ChunkId, Vec<BlobEntry>>,
}

impl IndexState {
    /// Number of blob entries.
    pub fn entries(&self) -> usize {
        self.tables.values().map(Vec::len).sum()
    }
}

/// Reads every index file of `repo`. An unreadable one is an error: without it, prune cannot
/// know which packs are in use.
pub fn load_index(repo: &Repository) -> Result<IndexState> {
    let mut st = IndexState::default();
    let mut files = list_index_files(repo)?;
    files.sort();
    for id in files {
        let f = IndexFile::read(
            repo.backend().as_ref(),
            &backend::key("index", &id),
            repo.sealer(),
        )?;
        for (pack, entries) in f.packs {
            st.tables.entry(pack).or_insert(entries);
        }
        st.files.push(id);
    }
    Ok(st)
}

/// Where pack `id` is (for messages, and the tests of a local repository).
pub fn pack_path(repo: &Repository, id: &ChunkId) -> PathBuf {
    repo.backend().display_path(&backend::pack_key(id))
}

/// Writes index files naming every pack of `tables` except those of `drop`; returns their ids.
pub fn write_compacted(
    repo: &Repository,
    tables: &HashMap<ChunkId, Vec<BlobEntry>>,
    drop: &HashSet<ChunkId>,
) -> Result<Vec<String>> {
    let mut kept: Vec<(&ChunkId, &Vec<BlobEntry>)> =
        tables.iter().filter(|(p, _)| !drop.contains(*p)).collect();
    kept.sort_by_key(|a| a.0.0);
    let mut ids = Vec::new();
    let mut file = IndexFile::default();
    let mut n = 0usize;
    for (pack, entries) in kept {
        if n > 0 && n + entries.len() > MAX_ENTRIES_PER_FILE {
            ids.push(std::mem::take(&mut file).write(repo)?);
            n = 0;
        }
        n += entries.len();
        file.packs.push((*pack, entries.clone()));
    }
    if !file.packs.is_empty() {
        ids.push(file.write(repo)?);
    }
    Ok(ids)
}

/// Deletes index files `ids` (missing ones are fine) and makes that durable.
pub fn delete_index_files(repo: &Repository, ids: &[String]) -> Result<()> {
    for id in ids {
        // Only names an index file can have: never a path elsewhere.
        if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        repo.backend().delete(&backend::key("index", id))?;
    }
    Ok(())
}

/// Every pack file on disk (id, size); `.tmp-*` files of dead writers older than `before`
/// are removed on the way (their count is returned too).
pub fn list_pack_files(
    repo: &Repository,
    before: Option<std::time::SystemTime>,
) -> Result<(Vec<(ChunkId, u64)>, usize)> {
    let b = repo.backend();
    if let (Some(t), Some(root)) = (before, b.local_root()) {
        // Packs being written by killed writers, in a local repository.
        let mut temps = 0;
        for i in 0..=255u8 {
            temps += fsio::remove_stale_temp_files(&root.join("packs").join(format!("{i:02x}")), t);
        }
        let (out, _) = list_pack_objects(b.as_ref())?;
        return Ok((out, temps));
    }
    list_pack_objects(b.as_ref())
}

/// Every object named like a pack in `packs/00` … `packs/ff` of `b`, with its size.
fn list_pack_objects(b: &dyn WriteBackend) -> Result<(Vec<(ChunkId, u64)>, usize)> {
    let mut out = Vec::new();
    b.list_fanout("packs", &mut |m| {
        let name = backend::base_name(&m.name);
        if name.len() == 64
            && let Some(id) = ChunkId::from_hex(name)
        {
            out.push((id, m.size));
        }
        Ok(())
    })?;
    Ok((out, 0))
}

/// Every file named by a full hex id in the 256 fan-out directories `root/00`..`root/ff`
/// (pack files, or format 1 chunk files), with its size; with `before`, `.tmp-*` files of
/// dead writers older than it are removed on the way (their count is returned too).
pub fn list_id_files(
    root: &Path,
    before: Option<std::time::SystemTime>,
) -> Result<(Vec<(ChunkId, u64)>, usize)> {
    let mut out = Vec::new();
    let mut temps = 0;
    for i in 0..=255u8 {
        let dir = root.join(format!("{i:02x}"));
        if let Some(t) = before {
            temps += fsio::remove_stale_temp_files(&dir, t);
        }
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io("list", &dir, e)),
        };
        for e in entries {
            let e = e.ctx("list", &dir)?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = ChunkId::from_hex(&name) else {
                continue;
            };
            if name.len() != 64 {
                continue;
            }
            let len = e.metadata().map(|m| m.len()).unwrap_or(0);
            out.push((id, len));
        }
    }
    Ok((out, temps))
}

/// Deletes pack `id`; false when it was gone already (a concurrent or earlier prune).
pub fn remove_pack(repo: &Repository, id: &ChunkId) -> Result<bool> {
    repo.backend().delete(&backend::pack_key(id))
}

/// Deletes the file `path`; false when it was gone already (a concurrent or earlier prune).
pub fn remove_if_present(path: &Path) -> Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io("delete", path, e)),
    }
}

/// What finishing the pending records did.
#[derive(Debug, Default)]
pub struct SweepOutcome {
    pub packs_deleted: u64,
    pub bytes_deleted: u64,
    pub packs_rescued: u64,
    /// Records left for a later prune: a running backup does not know them yet.
    pub deferred: Vec<String>,
    pub records_finished: u64,
}

/// Finishes the pending records `records` (step 7 of the prune). `remark` computes the live
/// set of the repository now; it is called at most once, and only when some record can
/// proceed.
pub fn finish_records(
    repo: &Repository,
    records: &[PendingRecord],
    remark: &mut dyn FnMut() -> Result<HashSet<ChunkId>>,
    abort: &AbortPoint,
) -> Result<SweepOutcome> {
    let mut out = SweepOutcome::default();
    if records.is_empty() {
        return Ok(out);
    }
    // The old index files go first in any case: the compacted index replaced them before
    // the record was written.
    for r in records {
        delete_index_files(repo, &r.index)?;
    }
    abort.at("old-index-deleted");
    let writers: Vec<WriterInfo> = writers::live_writers(repo)?;
    let mut live: Option<HashSet<ChunkId>> = None;
    let condemned_all: HashSet<ChunkId> = records.iter().flat_map(|r| r.packs.clone()).collect();
    for rec in records {
        if writers.iter().any(|w| !w.knows.contains(&rec.id)) {
            out.deferred.push(rec.id.clone());
            continue;
        }
        let live = match &mut live {
            Some(l) => l,
            None => live.insert(remark()?),
        };
        // The tables of the condemned packs still on disk, and the live blobs they hold.
        let mut tables: Vec<(ChunkId, Option<Vec<BlobEntry>>, u64)> = Vec::new();
        let mut needed: HashSet<ChunkId> = HashSet::new();
        for pack in &rec.packs {
            let len = match repo.backend().head(&backend::pack_key(pack)) {
                Ok(Some(m)) => m.size,
                Ok(None) => continue,
                // Not a regular file: nobody can read it as a pack.
                Err(Error::NotRegularFile { .. }) => 0,
                Err(e) => return Err(e),
            };
            // A pack whose table cannot be read cannot be read by anyone: it goes.
            let table = read_pack_table(repo.backend().as_ref(), pack, repo.sealer()).ok();
            if let Some(t) = &table {
                needed.extend(t.iter().map(|e| e.id).filter(|id| live.contains(id)));
            }
            tables.push((*pack, table, len));
        }
        if !needed.is_empty() {
            // Live blobs with a location outside every condemned pack need no rescue.
            let now = load_index(repo)?;
            for (p, entries) in &now.tables {
                if condemned_all.contains(p) {
                    continue;
                }
                for e in entries {
                    needed.remove(&e.id);
                }
            }
        }
        for (pack, table, len) in tables {
            let rescue = table
                .as_ref()
                .is_some_and(|t| t.iter().any(|e| needed.contains(&e.id)));
            if let (true, Some(t)) = (rescue, table) {
                IndexFile {
                    packs: vec![(pack, t)],
                }
                .write(repo)?;
                out.packs_rescued += 1;
                abort.at("rescue");
                continue;
            }
            if remove_pack(repo, &pack)? {
                out.packs_deleted += 1;
                out.bytes_deleted += len;
            }
            abort.at("pack-deleted");
        }
        writers::remove_pending(repo, &rec.id)?;
        out.records_finished += 1;
        abort.at("pending-removed");
    }
    Ok(out)
}

/// What the removal of crash leftovers did.
#[derive(Debug, Default)]
pub struct OrphanOutcome {
    pub packs_deleted: u64,
    pub bytes_deleted: u64,
    pub temp_files_removed: u64,
    /// Skipped: a backup is running (its packs may not be indexed yet).
    pub skipped: bool,
}

/// Step 8: deletes packs that no index file and no pending record names, when no writer
/// runs, and stale `.tmp-*` files in `packs/*`.
pub fn remove_orphans(repo: &Repository, abort: &AbortPoint) -> Result<OrphanOutcome> {
    let started = std::time::SystemTime::now();
    let mut out = OrphanOutcome::default();
    // Packs first, then writers: a pack listed here whose writer has not finished indexing
    // it belongs to a writer that is still alive below.
    let (on_disk, temps) = list_pack_files(repo, Some(started))?;
    out.temp_files_removed = temps as u64;
    if !writers::live_writers(repo)?.is_empty() {
        out.skipped = true;
        return Ok(out);
    }
    let mut named: HashSet<ChunkId> = load_index(repo)?.tables.into_keys().collect();
    for r in writers::read_pending(repo)? {
        named.extend(r.packs);
    }
    for (pack, len) in on_disk {
        if named.contains(&pack) {
            continue;
        }
        if remove_pack(repo, &pack)? {
            out.packs_deleted += 1;
            out.bytes_deleted += len;
        }
        abort.at("orphans");
    }
    Ok(out)
}
