//! The blob store: finds blobs through the index, reads and decodes their frames (with a
//! small cache of decoded frames), and checks each blob against its id.
//!
//! A reader's store ([`BlobStore::open`]) also reads the tables of the packs named by
//! pending records: a prune condemned them, but until they are deleted a reader that loaded
//! the index earlier may still be sent there, and they hold blobs a snapshot may need. A
//! writer's store ([`BlobStore::open_writer`]) leaves out the packs of the pending records it
//! knows: it must never refer to them (docs/FORMAT.md F2.8).
//!
//! When a pack is missing (deleted by a prune after a repack), the store reloads every index
//! file once and looks the blob up again.

use super::Repository;
use super::backend::{self, WriteBackend};
use super::blob::{BlobEntry, BlobKind, BlobSource, Location};
use super::fsio;
use super::index::Index;
use super::pack::{read_frame_raw, read_pack_table};
use super::seal::Sealer;
use super::writers::{PendingRecord, read_pending_dir_lenient};
use crate::error::{Error, Result};
use crate::hash::ChunkId;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

/// Decoded frames kept (each at most 16 MiB, normally at most 1 MiB).
const FRAME_CACHE: usize = 16;
/// Checked blobs kept.
const BLOB_CACHE: usize = 32;
/// Threads fetching read windows ahead of readers (object storage).
const PREFETCHERS: usize = 2;

/// Shared decoded bytes.
type Content = Arc<Vec<u8>>;

/// A tiny least-recently-used cache: a few entries, scanned linearly.
struct Lru<K, V> {
    cap: usize,
    tick: u64,
    items: Vec<(K, V, u64)>,
}

impl<K: PartialEq, V: Clone> Lru<K, V> {
    fn new(cap: usize) -> Self {
        Lru {
            cap,
            tick: 0,
            items: Vec::with_capacity(cap),
        }
    }

    fn get(&mut self, k: &K) -> Option<V> {
        self.tick += 1;
        let tick = self.tick;
        self.items.iter_mut().find(|(key, ..)| key == k).map(|it| {
            it.2 = tick;
            it.1.clone()
        })
    }

    fn put(&mut self, k: K, v: V) {
        self.tick += 1;
        if let Some(it) = self.items.iter_mut().find(|(key, ..)| *key == k) {
            it.1 = v;
            it.2 = self.tick;
            return;
        }
        if self.items.len() >= self.cap
            && let Some(oldest) = (0..self.items.len()).min_by_key(|&i| self.items[i].2)
        {
            self.items.swap_remove(oldest);
        }
        self.items.push((k, v, self.tick));
    }
}

/// Blob access of one repository (thread-safe).
pub struct BlobStore {
    backend: Arc<dyn WriteBackend>,
    /// Where frames are read from: the backend, or read windows over it when its ranged
    /// reads are not cheap (object storage, [`backend::window`]).
    frames_from: Arc<dyn backend::ReadBackend>,
    /// The read windows, when frames are read through them (they also know packs' sizes).
    windows: Option<Arc<backend::window::Windows>>,
    /// How objects are stored and blobs named.
    sealer: Sealer,
    /// A reader's store: also reads the packs of pending records.
    reader: bool,
    /// A format-1 repository (chunk files): no packs, no index.
    format1: bool,
    exclude: HashSet<ChunkId>,
    index: RwLock<Index>,
    /// Blobs in packs a packer is still writing: known (for deduplication), not readable.
    unsealed: Mutex<HashSet<ChunkId>>,
    /// Decoded frames by (pack, frame offset).
    frames: Mutex<Lru<(ChunkId, u32), Content>>,
    /// Checked blobs by (id, kind).
    blobs: Mutex<Lru<(ChunkId, BlobKind), Content>>,
    /// Packs found missing (the index was reloaded for each once).
    missing: Mutex<HashSet<ChunkId>>,
    /// Packs this process inserted ([`BlobStore::insert`]): kept across a reload, their
    /// index file may not be written yet.
    inserted: Mutex<Vec<ChunkId>>,
    /// Length of each pack file [`BlobStore::usable`] looked at (`None`: missing, set aside
    /// or not a regular file).
    pack_lengths: Mutex<HashMap<ChunkId, Option<u64>>>,
    /// Blobs [`BlobStore::usable`] refused because none of their packs could serve them.
    unusable: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStore")
            .field("backend", &self.backend)
            .field("reader", &self.reader)
            .field("blobs", &self.with_index(|i| i.len()))
            .finish_non_exhaustive()
    }
}

impl BlobStore {
    /// A reader's store: every index file, plus the tables of packs of pending records.
    pub fn open(repo: &Repository) -> Result<Arc<BlobStore>> {
        BlobStore::new(repo, true, HashSet::new())
    }

    /// A writer's store: every index file, without the packs of `known_pending` (now and
    /// at every refresh).
    pub fn open_writer(
        repo: &Repository,
        known_pending: &[PendingRecord],
    ) -> Result<Arc<BlobStore>> {
        let exclude = known_pending
            .iter()
            .flat_map(|r| r.packs.iter().copied())
            .collect();
        BlobStore::new(repo, false, exclude)
    }

    fn new(repo: &Repository, reader: bool, exclude: HashSet<ChunkId>) -> Result<Arc<BlobStore>> {
        let backend = repo.backend().clone();
        let windows = (!backend.capabilities().cheap_ranged_reads)
            .then(|| Arc::new(backend::window::Windows::new(backend.clone(), PREFETCHERS)));
        let frames_from: Arc<dyn backend::ReadBackend> = match &windows {
            Some(w) => w.clone(),
            None => backend.clone(),
        };
        let store = BlobStore {
            backend,
            frames_from,
            windows,
            sealer: repo.sealer().clone(),
            reader,
            format1: repo.format_version() == 1,
            exclude,
            index: RwLock::new(Index::default()),
            unsealed: Mutex::new(HashSet::new()),
            frames: Mutex::new(Lru::new(FRAME_CACHE)),
            blobs: Mutex::new(Lru::new(BLOB_CACHE)),
            missing: Mutex::new(HashSet::new()),
            inserted: Mutex::new(Vec::new()),
            pack_lengths: Mutex::new(HashMap::new()),
            unusable: std::sync::atomic::AtomicU64::new(0),
        };
        let index = store.load_index()?;
        *store.index_mut() = index;
        Ok(Arc::new(store))
    }

    /// Builds the index from scratch: index files, then (readers) pending packs' tables.
    /// A format-1 repository has no blobs: its index is empty.
    fn load_index(&self) -> Result<Index> {
        if self.format1 {
            return Ok(Index::default());
        }
        let mut index =
            Index::load_dir(self.backend.as_ref(), "index", &self.exclude, &self.sealer)?;
        if self.reader {
            let records =
                match read_pending_dir_lenient(self.backend.as_ref(), "pending", &self.sealer) {
                    Ok(r) => r,
                    // A repository without pending/ (read-only medium, say) has none.
                    Err(e) if fsio::is_not_found(&e) => Vec::new(),
                    Err(e) => return Err(e),
                };
            for pack in records.iter().flat_map(|r| r.packs.iter()) {
                if index.pack_entries(pack).is_some() {
                    continue;
                }
                match read_pack_table(self.backend.as_ref(), pack, &self.sealer) {
                    Ok(entries) => index.insert_fallback(*pack, &entries),
                    // Already deleted, or damaged: its blobs are indexed elsewhere or lost,
                    // which reading them reports.
                    Err(_) => continue,
                }
            }
        }
        Ok(index)
    }

    fn index_mut(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    /// True when blob `id` is indexed or in a pack being written.
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.with_index(|i| i.contains(id))
            || self
                .unsealed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(id)
    }

    /// True when a backup may refer to blob `id` again: it is in a pack being written, or
    /// one of its indexed locations lies in a pack file that exists and is long enough to
    /// hold it (a stat per pack, remembered). A blob whose packs are missing or were set
    /// aside by `verify` is not usable: the backup reads and stores its blocks again, which
    /// also makes older snapshots that name it readable again (docs/REPAIR.md).
    pub fn usable(&self, id: &ChunkId) -> bool {
        if self
            .unsealed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
        {
            return true;
        }
        let Some(first) = self.location(id) else {
            return false;
        };
        if self.pack_holds(&first) {
            return true;
        }
        let others = self.with_index(|i| i.locations(id));
        if others.iter().skip(1).any(|l| self.pack_holds(l)) {
            return true;
        }
        self.unusable
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        false
    }

    /// Blobs [`BlobStore::usable`] found indexed but in no usable pack.
    pub fn unusable_count(&self) -> u64 {
        self.unusable.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// True when the pack of `loc` is a regular file that reaches past the blob's frame.
    fn pack_holds(&self, loc: &Location) -> bool {
        let cached = self
            .pack_lengths
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&loc.pack)
            .copied();
        let len = match cached {
            Some(len) => len,
            None => {
                let name = backend::pack_key(&loc.pack);
                // On object storage the read windows know every pack's size from one
                // listing of `packs/` (a HEAD only for a pack it did not show), instead of a
                // HEAD per pack.
                let len = match &self.windows {
                    Some(w) => w.size_of(&name).ok(),
                    None => self.backend.head(&name).ok().flatten().map(|m| m.size),
                };
                self.pack_lengths
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(loc.pack, len);
                len
            }
        };
        let end = u64::from(loc.entry.frame_offset) + u64::from(loc.entry.frame_len);
        len.is_some_and(|l| l >= end)
    }

    /// Where blob `id` is, when indexed.
    pub fn location(&self, id: &ChunkId) -> Option<Location> {
        self.with_index(|i| i.get(id))
    }

    /// Adds the table of a finished pack.
    pub fn insert(&self, pack: ChunkId, entries: &[BlobEntry]) {
        self.index_mut().insert(pack, entries);
        self.inserted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(pack);
    }

    /// Records blobs appended to a pack not finished yet (the packer): [`BlobStore::contains`]
    /// sees them at once.
    pub(crate) fn add_unsealed(&self, ids: impl IntoIterator<Item = ChunkId>) {
        self.unsealed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(ids);
    }

    /// Forgets blobs recorded by [`BlobStore::add_unsealed`] (their pack is now inserted).
    pub(crate) fn remove_unsealed(&self, ids: impl IntoIterator<Item = ChunkId>) {
        let mut set = self.unsealed.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            set.remove(&id);
        }
    }

    /// Records index file `id` as loaded (its writer inserted its packs already).
    pub(crate) fn mark_index_loaded(&self, id: &str) {
        self.index_mut().mark_loaded(id);
    }

    /// Loads index files written since the store was opened or last refreshed.
    pub fn refresh(&self) -> Result<()> {
        if self.format1 {
            return Ok(());
        }
        // Read without holding the lock: readers keep going meanwhile.
        let known = self.with_index(|i| i.files());
        let fresh = Index::load_new(
            self.backend.as_ref(),
            "index",
            &self.exclude,
            &known,
            &self.sealer,
        )?;
        self.index_mut().merge(&fresh);
        Ok(())
    }

    /// Replaces the index by a fresh load of every index file, once per missing pack: a
    /// pack deleted by a prune after a repack sends readers to the blobs' new places; a pack
    /// lost for good does not reload the index at every read of its blobs.
    fn reload_for(&self, missing_pack: &ChunkId) -> Result<()> {
        // Held during the reload: another thread that met the same missing pack waits for
        // the new index instead of retrying against the old one.
        let mut missing = self.missing.lock().unwrap_or_else(|p| p.into_inner());
        if !missing.insert(*missing_pack) {
            return Ok(());
        }
        let mut fresh = self.load_index()?;
        let inserted = self
            .inserted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut index = self.index_mut();
        for pack in inserted {
            if let Some(entries) = index.pack_entries(&pack) {
                fresh.insert(pack, entries);
            }
        }
        *index = fresh;
        Ok(())
    }

    /// The decoded frame at `loc`. When the pack is missing, the index is reloaded once; if
    /// the blob now lies at the same place of another frame (a tree blob alone in its frame,
    /// say), that frame is returned, otherwise the error (read the blob with
    /// [`BlobSource::blob`], which follows the blob wherever it went).
    pub fn frame(&self, loc: &Location) -> Result<Arc<Vec<u8>>> {
        match self.read_frame(loc) {
            Err(e) if is_missing_pack(&e) => {
                self.reload_for(&loc.pack)?;
                match self.location(&loc.entry.id) {
                    Some(new)
                        if new.pack != loc.pack
                            && new.entry.raw_offset == loc.entry.raw_offset
                            && new.entry.raw_len == loc.entry.raw_len =>
                    {
                        self.read_frame(&new)
                    }
                    _ => Err(e),
                }
            }
            r => r,
        }
    }

    /// The decoded frame at `loc`, from the cache or the pack (a missing pack is an
    /// [`Error::MissingChunk`] naming the blob and the pack's path).
    fn read_frame(&self, loc: &Location) -> Result<Arc<Vec<u8>>> {
        let key = (loc.pack, loc.entry.frame_offset);
        if let Some(f) = self
            .frames
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok(f);
        }
        let frame = match read_frame_raw(
            self.frames_from.as_ref(),
            &loc.pack,
            &loc.entry,
            &self.sealer,
        ) {
            Ok(f) => Arc::new(f),
            Err(e) if fsio::is_not_found(&e) => {
                return Err(Error::MissingChunk {
                    id: loc.entry.id.to_hex(),
                    path: self.pack_path(&loc.pack),
                });
            }
            Err(e) => return Err(e),
        };
        self.frames
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(key, frame.clone());
        Ok(frame)
    }

    /// Where pack `pack` lives.
    pub fn pack_path(&self, pack: &ChunkId) -> PathBuf {
        self.backend.display_path(&backend::pack_key(pack))
    }

    /// Where the repository's objects are.
    pub fn backend(&self) -> &Arc<dyn WriteBackend> {
        &self.backend
    }

    /// How the repository stores objects and names blobs ([`Sealer::blob_id`]).
    pub fn sealer(&self) -> &Sealer {
        &self.sealer
    }

    /// Runs `f` on the in-memory index.
    pub fn with_index<R>(&self, f: impl FnOnce(&Index) -> R) -> R {
        match self.index.read() {
            Ok(i) => f(&i),
            Err(poisoned) => f(&poisoned.into_inner()),
        }
    }

    /// Blob `id` at `loc`: sliced out of its frame and checked against its id.
    fn blob_at(&self, id: &ChunkId, kind: BlobKind, loc: &Location) -> Result<Arc<Vec<u8>>> {
        let e = &loc.entry;
        if e.kind != kind {
            return Err(Error::corrupt(
                format!("blob {id}"),
                self.pack_path(&loc.pack),
                format!(
                    "indexed as a {} blob (frame at offset {}), a {} blob was expected",
                    e.kind.name(),
                    e.frame_offset,
                    kind.name()
                ),
            ));
        }
        let frame = self.read_frame(loc)?;
        let (start, end) = (
            e.raw_offset as usize,
            e.raw_offset as usize + e.raw_len as usize,
        );
        // read_frame_raw checked the bounds; a cached frame was read for the same offset.
        let Some(content) = frame.get(start..end) else {
            return Err(Error::corrupt(
                format!("blob {id}"),
                self.pack_path(&loc.pack),
                format!(
                    "bytes {start}..{end} lie beyond its frame at offset {} ({} bytes)",
                    e.frame_offset,
                    frame.len()
                ),
            ));
        };
        let actual = self.sealer.blob_id(content);
        if actual != *id {
            return Err(Error::corrupt(
                format!("blob {id}"),
                self.pack_path(&loc.pack),
                format!(
                    "content at {start}+{} of the frame at offset {} hashes to {actual}",
                    e.raw_len, e.frame_offset
                ),
            ));
        }
        let blob = if start == 0 && end == frame.len() {
            frame
        } else {
            Arc::new(content.to_vec())
        };
        self.blobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put((*id, kind), blob.clone());
        Ok(blob)
    }
}

fn is_missing_pack(e: &Error) -> bool {
    matches!(e, Error::MissingChunk { .. })
}

impl BlobSource for BlobStore {
    fn readers(&self) -> usize {
        let caps = self.backend.capabilities();
        if caps.cheap_ranged_reads {
            0
        } else {
            caps.parallelism
        }
    }

    fn blob(&self, id: &ChunkId, kind: BlobKind) -> Result<Arc<Vec<u8>>> {
        if let Some(b) = self
            .blobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(*id, kind))
        {
            return Ok(b);
        }
        let loc = match self.location(id) {
            Some(l) => l,
            None => {
                // Written since the index was loaded?
                self.refresh()?;
                self.location(id).ok_or_else(|| Error::MissingChunk {
                    id: id.to_hex(),
                    path: self.backend.display_path("index"),
                })?
            }
        };
        let first = match self.blob_at(id, kind, &loc) {
            Err(e) if is_missing_pack(&e) => {
                // Repacked by a prune: the index files now say where it went.
                self.reload_for(&loc.pack)?;
                match self.location(id) {
                    Some(new) if new.pack != loc.pack => self.blob_at(id, kind, &new),
                    _ => Err(e),
                }
            }
            r => r,
        };
        match first {
            Ok(b) => Ok(b),
            // Stored again elsewhere (a backup after the pack was lost or set aside): any
            // other location that reads back right will do; otherwise the first error.
            Err(e) => {
                let others = self.with_index(|i| i.locations(id));
                for other in others.iter().filter(|l| l.pack != loc.pack) {
                    if let Ok(b) = self.blob_at(id, kind, other) {
                        return Ok(b);
                    }
                }
                Err(e)
            }
        }
    }
}
