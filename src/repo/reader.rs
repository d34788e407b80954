//! A snapshot as a [`Volume`]: random access to its bytes, served from the chunk store
//! (format 1: snapshots versions 1 and 2) or the blob store (format 2: version 3, whose
//! blocks are pieces of data blobs named by a tree; see [`super::tree`]).
//!
//! Two modes:
//! - plain ([`SnapshotVolume::new`]): every `read_at` decodes the chunks it touches. Right for
//!   restore, verify and export, which read each block once in large pieces.
//! - cached ([`SnapshotVolume::with_cache`]): decoded blocks are kept in a bounded LRU cache,
//!   and a sequential reader triggers read-ahead on background threads. Right for `mount` and
//!   `serve`, where the kernel or an NBD client asks for small pieces and comes back to the
//!   same block many times. The cache holds units of consecutive blocks of at least
//!   [`CACHE_UNIT`] bytes (one block when blocks are that large): with 4 KiB blocks, a
//!   cache entry per block cost more in bookkeeping than the decoding itself.

use super::blob::BlobKind;
use super::chunks::ChunkStore;
use super::format::BlockRef;
use super::load_cache::LoadCache;
use super::snapshot::{BlockMap, SnapshotFile};
use crate::error::{Error, Result};
use crate::hash::ChunkId;
use crate::volume::Volume;
use crossbeam_channel::{Sender, TrySendError};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;

/// Read access to one snapshot.
pub struct SnapshotVolume {
    inner: Arc<Inner>,
    cache: Option<Arc<BlockCache>>,
    prefetch: Option<Prefetcher>,
    /// Blocks per cache unit.
    unit: u64,
}

/// Smallest unit of the decoded-block cache and of read-ahead: 256 KiB.
pub const CACHE_UNIT: u64 = 256 << 10;

struct Inner {
    snap: SnapshotFile,
    /// The block map, built at first use (a version 3 snapshot without its blob source is
    /// an error for each read, not at construction).
    map: OnceLock<BlockMap>,
    chunks: ChunkStore,
    /// Decoded pack chunks: consecutive blocks of a pack are read one after the other, often
    /// by different threads, and the pack is decoded once for all of them.
    packs: LoadCache<ChunkId, Pack>,
    /// Data blobs (format 2), for the same reason: a blob holds several consecutive blocks.
    blobs: LoadCache<ChunkId, Arc<Vec<u8>>>,
}

/// A decoded pack and the slices found to match their snapshot's hash so far.
struct Pack {
    data: Vec<u8>,
    verified: Mutex<Vec<(u8, ChunkId)>>,
}

/// Decoded packs a reader keeps (a pack is at most 4 MiB at the default block size).
const CACHED_PACKS: usize = 8;

/// Data blobs a reader keeps (a blob is at most 1 MiB, 64 KiB on average): enough for every
/// restore worker to keep the blobs of the piece it reads.
const CACHED_BLOBS: usize = 64;

/// Settings of the decoded-block cache.
#[derive(Debug, Clone, Copy)]
pub struct CacheOptions {
    /// Bytes of decoded blocks kept (at least 8 blocks are kept whatever this says).
    pub capacity: u64,
    /// Bytes read ahead of a sequential reader (0: no read-ahead).
    pub read_ahead: u64,
    /// Threads decoding read-ahead blocks.
    pub threads: usize,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            capacity: 64 << 20,
            read_ahead: 8 << 20,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    fn block_size(&self) -> u64 {
        self.snap.header().block_size as u64
    }

    fn size(&self) -> u64 {
        self.snap.header().source.size
    }

    fn map(&self) -> Result<&BlockMap> {
        if let Some(m) = self.map.get() {
            return Ok(m);
        }
        let m = self.snap.block_map()?;
        Ok(self.map.get_or_init(|| m))
    }

    fn block_ref(&self, index: u64) -> Result<BlockRef> {
        if index >= self.snap.header().block_count {
            let bs = self.block_size();
            return Err(Error::read_out_of_range(
                format!("snapshot {}", self.snap.id()),
                index.saturating_mul(bs),
                bs,
                self.size(),
            ));
        }
        self.map()?.block_ref(index)
    }

    /// Blocks `[first, first + count)` (the end clamped to the volume), decoded into one
    /// new buffer.
    fn decode_blocks(&self, first: u64, count: u64) -> Result<Vec<u8>> {
        let end = (first + count).min(self.snap.header().block_count);
        let bs = self.block_size();
        let bytes = (self.size().min(end * bs)).saturating_sub(first * bs) as usize;
        let mut out = Vec::with_capacity(bytes);
        let mut block = Vec::new();
        for index in first..end {
            self.read_block(index, &mut block)?;
            out.extend_from_slice(&block);
        }
        Ok(out)
    }

    fn block_len(&self, index: u64) -> usize {
        let bs = self.block_size();
        (self.size() - index * bs).min(bs) as usize
    }

    /// The decoded pack `pack`, from the cache or read now. Its own hash is not checked:
    /// each slice is checked against the hash its snapshot records (see `with_slice`).
    fn pack(&self, pack: &ChunkId) -> Result<Arc<Pack>> {
        self.packs.get(*pack, || {
            let mut data = Vec::new();
            self.chunks.read_into(pack, &mut data, false)?;
            Ok(Pack {
                data,
                verified: Mutex::new(Vec::new()),
            })
        })
    }

    /// Bytes `[within, within + n)` of block `index`, stored as slice `slot` of `pack` with
    /// content hash `hash`, passed to `f`. The slice is checked against `hash` the first time.
    #[allow(clippy::too_many_arguments)]
    fn with_slice<T>(
        &self,
        index: u64,
        hash: &ChunkId,
        pack: &ChunkId,
        slot: u8,
        within: usize,
        n: usize,
        f: impl FnOnce(&[u8]) -> T,
    ) -> Result<T> {
        let p = self.pack(pack)?;
        let corrupt = |detail: String| {
            Error::corrupt(
                format!("chunk {pack}"),
                self.chunks.path(pack),
                format!("{detail} (block {index} of snapshot {})", self.snap.id()),
            )
        };
        let len = self.block_len(index) as u64;
        let Some(piece) = super::format::pack_slice(&p.data, slot, self.block_size(), len) else {
            return Err(corrupt(format!(
                "pack holds {} bytes, too few for slice {slot}",
                p.data.len()
            )));
        };
        if !lock(&p.verified).contains(&(slot, *hash)) {
            let actual = self.chunks.hash_algorithm().hash(piece);
            if actual != *hash {
                return Err(corrupt(format!(
                    "slice {slot} hashes to {actual}, the snapshot says {hash}"
                )));
            }
            lock(&p.verified).push((slot, *hash));
        }
        let part = piece
            .get(within..within + n)
            .ok_or_else(|| corrupt(format!("slice {slot} is shorter than the block")))?;
        Ok(f(part))
    }

    /// Data blob `id`, from the cache or the snapshot's blob source (which checks it against
    /// its id).
    fn blob(&self, id: &ChunkId) -> Result<Arc<Vec<u8>>> {
        let data = self.blobs.get(*id, || {
            let src = self.snap.blobs().ok_or_else(|| {
                Error::internal(
                    "snapshot reader",
                    format!(
                        "snapshot {} was opened without its blob store",
                        self.snap.id()
                    ),
                )
            })?;
            src.blob(id, BlobKind::Data)
        })?;
        Ok(Arc::clone(&data))
    }

    /// Bytes `[within, within + n)` of block `index`, stored as piece `piece` of blob `blob`,
    /// passed to `f`.
    fn with_piece<T>(
        &self,
        index: u64,
        blob: &ChunkId,
        piece: u32,
        within: usize,
        n: usize,
        f: impl FnOnce(&[u8]) -> T,
    ) -> Result<T> {
        let data = self.blob(blob)?;
        let len = self.block_len(index) as u64;
        let bs = self.block_size();
        let start = u64::from(piece) * bs + within as u64;
        let part = (within as u64 + n as u64 <= len)
            .then(|| {
                let s = usize::try_from(start).ok()?;
                data.get(s..s.checked_add(n)?)
            })
            .flatten();
        // The block must be whole in the blob, not only the part asked for.
        let whole = u64::from(piece) * bs + len <= data.len() as u64;
        match part {
            Some(p) if whole => Ok(f(p)),
            _ => Err(Error::corrupt(
                format!("blob {blob}"),
                self.snap.path(),
                format!(
                    "holds {} bytes, too few for piece {piece} (block {index} of snapshot {})",
                    data.len(),
                    self.snap.id()
                ),
            )),
        }
    }

    fn read_block(&self, index: u64, buf: &mut Vec<u8>) -> Result<BlockRef> {
        let r = self.block_ref(index)?;
        let len = self.block_len(index);
        match r {
            BlockRef::Zero | BlockRef::Unused => {
                buf.clear();
                buf.resize(len, 0);
            }
            BlockRef::Part { blob, index: piece } => {
                self.with_piece(index, &blob, piece, 0, len, |p| {
                    buf.clear();
                    buf.extend_from_slice(p);
                })?;
            }
            BlockRef::Slice {
                hash,
                pack,
                index: slot,
            } => {
                self.with_slice(index, &hash, &pack, slot, 0, len, |p| {
                    buf.clear();
                    buf.extend_from_slice(p);
                })?;
            }
            BlockRef::Chunk(id) => {
                self.chunks.get_into(&id, buf)?;
                if buf.len() != len {
                    return Err(Error::corrupt(
                        format!("chunk {id}"),
                        self.chunks.path(&id),
                        format!(
                            "holds {} bytes but block {index} of snapshot {} has {len}",
                            buf.len(),
                            self.snap.id()
                        ),
                    ));
                }
            }
        }
        Ok(r)
    }
}

/// Decoded blocks, keyed by block index.
type BlockCache = LoadCache<u64, Vec<u8>>;

/// Background threads decoding blocks ahead of a sequential reader.
struct Prefetcher {
    queue: Option<Sender<u64>>,
    threads: Vec<JoinHandle<()>>,
    /// Blocks to keep queued ahead of the reader.
    window: u64,
    position: Mutex<ReadPosition>,
}

/// Where a sequential reader is, for read-ahead.
struct ReadPosition {
    /// End offset of the previous read (`u64::MAX`: none yet).
    last_end: u64,
    /// Units below this were already queued for read-ahead.
    queued_to: u64,
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.queue.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Opens snapshot `id` of `repo` for reading its blocks: a version 3 snapshot gets the
/// repository's blob store attached (see [`SnapshotFile::set_blobs`]).
pub fn open_snapshot(repo: &super::Repository, id: &str) -> Result<SnapshotFile> {
    let mut snap = repo.open_snapshot(id)?;
    if snap.tree().is_some() {
        snap.set_blobs(repo.blobs()?);
    }
    Ok(snap)
}

impl SnapshotVolume {
    /// Opens snapshot `id` of `repo` as a volume, with a decoded-block cache when `cache` is
    /// given ([`Self::with_cache`]), plain otherwise ([`Self::new`]).
    pub fn open(
        repo: &super::Repository,
        id: &str,
        cache: Option<CacheOptions>,
    ) -> Result<SnapshotVolume> {
        let snap = open_snapshot(repo, id)?;
        let chunks = repo.chunks().clone();
        Ok(match cache {
            Some(c) => SnapshotVolume::with_cache(snap, chunks, c),
            None => SnapshotVolume::new(snap, chunks),
        })
    }

    /// A plain reader (no block cache). A version 3 snapshot needs its blob source attached.
    pub fn new(snap: SnapshotFile, chunks: ChunkStore) -> SnapshotVolume {
        SnapshotVolume {
            inner: Arc::new(Inner {
                snap,
                map: OnceLock::new(),
                chunks,
                packs: LoadCache::new(CACHED_PACKS),
                blobs: LoadCache::new(CACHED_BLOBS),
            }),
            cache: None,
            prefetch: None,
            unit: 1,
        }
    }

    /// A reader with a decoded-block cache and read-ahead (for `mount` and `serve`).
    pub fn with_cache(snap: SnapshotFile, chunks: ChunkStore, options: CacheOptions) -> Self {
        let mut vol = SnapshotVolume::new(snap, chunks);
        let bs = vol.block_size().max(1);
        let unit = (CACHE_UNIT / bs).max(1);
        vol.unit = unit;
        let unit_bytes = bs * unit;
        let cache = Arc::new(BlockCache::new(
            (options.capacity / unit_bytes).max(8) as usize
        ));
        let window = (options.read_ahead / unit_bytes).min(cache.capacity() as u64 / 2);
        if window > 0 && options.threads > 0 {
            let (tx, rx) = crossbeam_channel::bounded::<u64>(window as usize * 2);
            let threads = (0..options.threads)
                .map(|_| {
                    let rx = rx.clone();
                    let cache = cache.clone();
                    let inner = vol.inner.clone();
                    std::thread::spawn(move || {
                        for u in rx {
                            if cache.claim(u) {
                                // A failed read-ahead is not reported: the reader that needs
                                // the unit decodes it again and gets the error then.
                                let _ = cache.load(u, || inner.decode_blocks(u * unit, unit));
                            }
                        }
                    })
                })
                .collect();
            vol.prefetch = Some(Prefetcher {
                queue: Some(tx),
                threads,
                window,
                position: Mutex::new(ReadPosition {
                    last_end: u64::MAX,
                    queued_to: 0,
                }),
            });
        }
        vol.cache = Some(cache);
        vol
    }

    pub fn snapshot(&self) -> &SnapshotFile {
        &self.inner.snap
    }

    pub fn block_size(&self) -> u64 {
        self.inner.block_size()
    }

    pub fn chunks(&self) -> &ChunkStore {
        &self.inner.chunks
    }

    /// The reference of block `index`.
    pub fn block_ref(&self, index: u64) -> Result<BlockRef> {
        self.inner.block_ref(index)
    }

    /// Reads block `index` whole into `buf` (resized to the block's length).
    /// Returns the block's reference.
    pub fn read_block(&self, index: u64, buf: &mut Vec<u8>) -> Result<BlockRef> {
        self.inner.read_block(index, buf)
    }

    /// Queues read-ahead after a read of `[offset, end)` when reads are sequential.
    fn read_ahead(&self, offset: u64, end: u64) {
        let Some(pf) = &self.prefetch else { return };
        let Some(queue) = &pf.queue else { return };
        let bs = self.block_size();
        let unit = self.unit;
        let units = self.inner.snap.header().block_count.div_ceil(unit);
        let (from, to) = {
            let mut st = lock(&pf.position);
            // Concurrent readers (the kernel's read-ahead, FUSE worker threads) deliver a
            // sequential stream slightly out of order: within two blocks counts as sequential.
            let sequential = st.last_end != u64::MAX && offset.abs_diff(st.last_end) <= 2 * bs;
            st.last_end = end;
            if !sequential {
                st.queued_to = 0;
                return;
            }
            let next = end.div_ceil(bs * unit);
            let from = st.queued_to.max(next);
            let to = (next + pf.window).min(units);
            if from >= to {
                return;
            }
            st.queued_to = to;
            (from, to)
        };
        let blocks = self.inner.snap.header().block_count;
        for u in from..to {
            let has_data = (u * unit..((u + 1) * unit).min(blocks))
                .any(|i| self.inner.block_ref(i).is_ok_and(|r| r.is_data()));
            if !has_data {
                continue;
            }
            match queue.try_send(u) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    let mut st = lock(&pf.position);
                    st.queued_to = st.queued_to.min(u);
                    break;
                }
            }
        }
    }
}

impl Volume for SnapshotVolume {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let size = self.size();
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > size) {
            return Err(Error::read_out_of_range(
                format!("snapshot {}", self.inner.snap.id()),
                offset,
                buf.len() as u64,
                size,
            ));
        }
        let bs = self.block_size();
        let mut done = 0usize;
        let mut block = Vec::new();
        while done < buf.len() {
            let pos = offset + done as u64;
            let index = pos / bs;
            let within = (pos % bs) as usize;
            let mut n = (bs as usize - within).min(buf.len() - done);
            let r = self.inner.block_ref(index)?;
            if let (Some(cache), true) = (&self.cache, r.is_data()) {
                // The rest of this block's cache unit, zero blocks included, in one copy.
                let u = index / self.unit;
                let first = u * self.unit;
                let at = ((index - first) * bs) as usize + within;
                let data = cache.get(u, || self.inner.decode_blocks(first, self.unit))?;
                let avail = data.len().saturating_sub(at);
                n = avail.min(buf.len() - done);
                let src = data.get(at..at + n).filter(|_| n > 0).ok_or_else(|| {
                    Error::corrupt(
                        format!("block {index} of snapshot {}", self.inner.snap.id()),
                        self.inner.snap.path(),
                        "decoded blocks are shorter than the snapshot says",
                    )
                })?;
                buf[done..done + n].copy_from_slice(src);
                done += n;
                continue;
            }
            let out = &mut buf[done..done + n];
            match r {
                BlockRef::Zero | BlockRef::Unused => out.fill(0),
                BlockRef::Slice {
                    hash,
                    pack,
                    index: slot,
                } if self.cache.is_none() => {
                    self.inner
                        .with_slice(index, &hash, &pack, slot, within, n, |p| {
                            out.copy_from_slice(p)
                        })?;
                }
                BlockRef::Part { blob, index: piece } if self.cache.is_none() => {
                    self.inner
                        .with_piece(index, &blob, piece, within, n, |p| out.copy_from_slice(p))?;
                }
                BlockRef::Chunk(_) | BlockRef::Slice { .. } | BlockRef::Part { .. } => {
                    self.inner.read_block(index, &mut block)?;
                    out.copy_from_slice(&block[within..within + n]);
                }
            }
            done += n;
        }
        if let (Some(_), Some(end)) = (&self.cache, end) {
            self.read_ahead(offset, end);
        }
        Ok(())
    }

    fn next_data(&self, offset: u64, end: u64) -> Result<Option<Range<u64>>> {
        let size = self.size();
        let end = end.min(size);
        if offset >= end {
            return Ok(None);
        }
        let bs = self.block_size();
        let last = (end - 1) / bs;
        // Run by run: one lookup per run of references, not per block.
        let map = self.inner.map()?;
        let mut i = offset / bs;
        while i <= last {
            let (r, n) = map.run_at(i)?;
            if r.is_data() {
                break;
            }
            i += n;
        }
        if i > last {
            return Ok(None);
        }
        let start = (i * bs).max(offset);
        let mut j = i;
        while j <= last {
            let (r, n) = map.run_at(j)?;
            if !r.is_data() {
                break;
            }
            j += n;
        }
        Ok(Some(start..(j.min(last + 1) * bs).min(end)))
    }

    fn describe(&self) -> String {
        format!("snapshot {}", &self.inner.snap.id()[..12])
    }

    fn readers(&self) -> usize {
        self.inner.snap.blobs().map_or(0, |b| b.readers())
    }

    fn known_hash(&self, offset: u64) -> Result<Option<crate::volume::KnownHash>> {
        if offset >= self.size() {
            return Ok(None);
        }
        let index = offset / self.block_size();
        Ok(self
            .inner
            .block_ref(index)?
            .content_hash()
            .map(|hash| crate::volume::KnownHash {
                start: index * self.block_size(),
                len: self.inner.block_len(index) as u64,
                algorithm: self.inner.snap.header().chunk_hash,
                hash,
            }))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::hash::HashAlgorithm;
    use crate::repo::blob::{BlobKind, BlobSink};
    use crate::repo::snapshot::testing::tree_snapshot;
    use crate::repo::tree::testing::MemBlobs;

    /// Stores `data` (blocks of 4096) as data blobs of up to 3 blocks into `sink`, zero blocks
    /// as ZERO; returns the runs of its block map.
    pub(crate) fn store_blocks(sink: &dyn BlobSink, data: &[u8]) -> Vec<(BlockRef, u64)> {
        let bs = 4096usize;
        let mut runs = Vec::new();
        let mut i = 0usize;
        let blocks = data.len().div_ceil(bs);
        let block = |k: usize| &data[k * bs..((k + 1) * bs).min(data.len())];
        while i < blocks {
            if block(i).iter().all(|&b| b == 0) {
                runs.push((BlockRef::Zero, 1));
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < blocks && j < i + 3 && !block(j).iter().all(|&b| b == 0) {
                j += 1;
            }
            let content = &data[i * bs..(j * bs).min(data.len())];
            let id = sink.put_blob(BlobKind::Data, content).unwrap();
            runs.push((BlockRef::Part { blob: id, index: 0 }, (j - i) as u64));
            i = j;
        }
        runs
    }

    /// A version 3 snapshot of `data` (blocks of 4096) in memory; returns the volume (cached
    /// or not) and the blob store.
    pub(crate) fn tree_volume(
        dir: &std::path::Path,
        data: &[u8],
        cache: Option<CacheOptions>,
    ) -> (SnapshotVolume, Arc<MemBlobs>) {
        let blobs = MemBlobs::new();
        let runs = store_blocks(&*blobs, data);
        let snap = tree_snapshot(dir, data.len() as u64, 4096, &runs, blobs.clone());
        let chunks = ChunkStore::new(dir.join("chunks"), HashAlgorithm::Blake3, false);
        let vol = match cache {
            Some(c) => SnapshotVolume::with_cache(snap, chunks, c),
            None => SnapshotVolume::new(snap, chunks),
        };
        (vol, blobs)
    }

    /// Blobs and tree nodes through the real packer and blob store, the snapshot through
    /// `SnapshotVolume::open`.
    #[test]
    fn a_format_2_repository_reads_back() {
        use crate::repo::snapshot::{testing::header, write_tree_snapshot};
        use crate::repo::tree::{TreeWriter, walk_tree};
        use crate::repo::{InitOptions, Repository, blobs::BlobStore, packer::Packer};
        for sealed in [false, true] {
            let seal = |r: Repository| if sealed { r.encrypted_for_tests() } else { r };
            let dir = tempfile::tempdir().unwrap();
            let repo =
                seal(Repository::init(&dir.path().join("r"), &InitOptions::default()).unwrap());
            let data = sample(20 * 4096 + 5);
            let id = {
                let store = BlobStore::open_writer(&repo, &[]).unwrap();
                let packer = Packer::new(&repo, store).unwrap();
                let runs = store_blocks(&packer, &data);
                let h = header(data.len() as u64, 4096);
                let mut w = TreeWriter::new(&packer, h.block_count);
                for &(r, n) in &runs {
                    w.push(r, n).unwrap();
                }
                let root = w.finish().unwrap();
                packer.checkpoint().unwrap();
                write_tree_snapshot(repo.backend().as_ref(), &h, root, repo.sealer()).unwrap()
            };
            let plain = Repository::open(&dir.path().join("r")).unwrap();
            assert_eq!(open_snapshot(&plain, &id).is_ok(), !sealed);
            let repo = seal(plain);
            for cache in [None, Some(CacheOptions::default())] {
                let vol = SnapshotVolume::open(&repo, &id, cache).unwrap();
                let mut all = vec![0u8; data.len()];
                vol.read_at(0, &mut all).unwrap();
                assert!(all == data);
            }
            let snap = open_snapshot(&repo, &id).unwrap();
            let (mut nodes, mut blobs) = (0, 0);
            walk_tree(
                &*repo.blobs().unwrap(),
                &snap.tree().unwrap(),
                &mut |_, k| {
                    match k {
                        BlobKind::Tree => nodes += 1,
                        BlobKind::Data => blobs += 1,
                    }
                    true
                },
            )
            .unwrap();
            assert_eq!(nodes, 1);
            assert_eq!(blobs, 7);
        }
    }

    pub(crate) fn sample(len: usize) -> Vec<u8> {
        let mut data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
        // Blocks 2 and 6 are zeros.
        data[2 * 4096..3 * 4096].fill(0);
        data[6 * 4096..7 * 4096].fill(0);
        data
    }

    #[test]
    fn version_3_snapshots_read_back() {
        let data = sample(9 * 4096 + 1000);
        for cache in [None, Some(CacheOptions::default())] {
            let dir = tempfile::tempdir().unwrap();
            let (vol, _) = tree_volume(dir.path(), &data, cache);
            assert_eq!(vol.size(), data.len() as u64);
            let mut all = vec![0u8; data.len()];
            vol.read_at(0, &mut all).unwrap();
            assert!(all == data);
            // Unaligned pieces across blocks and blobs.
            for (off, len) in [(4000u64, 300usize), (1, 4096 * 4), (9 * 4096 + 10, 990)] {
                let mut b = vec![0u8; len];
                vol.read_at(off, &mut b).unwrap();
                assert!(
                    b[..] == data[off as usize..off as usize + len],
                    "{off} {len}"
                );
            }
            let mut buf = Vec::new();
            assert!(matches!(
                vol.read_block(4, &mut buf).unwrap(),
                BlockRef::Part { index: 1, .. }
            ));
            assert!(buf[..] == data[4 * 4096..5 * 4096]);
            vol.read_block(9, &mut buf).unwrap();
            assert_eq!(buf.len(), 1000);
            // Part blocks are data without a hash of their own.
            assert_eq!(vol.known_hash(0).unwrap(), None);
            assert_eq!(vol.next_data(0, vol.size()).unwrap(), Some(0..2 * 4096));
            assert_eq!(
                vol.next_data(2 * 4096, vol.size()).unwrap(),
                Some(3 * 4096..6 * 4096)
            );
            assert_eq!(
                vol.next_data(4096 + 10, 5 * 4096).unwrap(),
                Some(4096 + 10..2 * 4096)
            );
            assert_eq!(
                vol.next_data(2 * 4096, 4 * 4096 + 5).unwrap(),
                Some(3 * 4096..4 * 4096 + 5)
            );
            assert_eq!(vol.next_data(6 * 4096, 7 * 4096).unwrap(), None);
            assert_eq!(
                vol.next_data(6 * 4096, vol.size()).unwrap(),
                Some(7 * 4096..vol.size())
            );
            assert!(vol.read_at(data.len() as u64 - 1, &mut [0u8; 2]).is_err());
        }
    }

    /// The cached reader (units of 64 blocks, read-ahead) gives the same bytes as the data
    /// for pieces of every size and alignment, across units and zero blocks, sequential or
    /// not, and the last partial block.
    #[test]
    fn cached_units_read_like_the_data() {
        let mut data = sample(200 * 4096 + 777);
        data[63 * 4096..66 * 4096].fill(0);
        data[130 * 4096..140 * 4096].fill(0);
        let dir = tempfile::tempdir().unwrap();
        let opts = CacheOptions {
            capacity: 1 << 20,
            read_ahead: 512 << 10,
            threads: 2,
        };
        let (vol, _) = tree_volume(dir.path(), &data, Some(opts));
        assert_eq!(vol.unit, 64);
        for step in [4096usize, 4096 * 32 + 1, 128 << 10, 300 << 10] {
            let mut off = 0usize;
            while off < data.len() {
                let n = step.min(data.len() - off);
                let mut b = vec![0u8; n];
                vol.read_at(off as u64, &mut b).unwrap();
                assert!(b[..] == data[off..off + n], "step {step} at {off}");
                off += n;
            }
        }
        let mut x = 12345u64;
        for _ in 0..300 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = (x >> 20) as usize % data.len();
            let n = ((x >> 5) as usize % (400 << 10)).clamp(1, data.len() - off);
            let mut b = vec![0u8; n];
            vol.read_at(off as u64, &mut b).unwrap();
            assert!(b[..] == data[off..off + n], "{off} {n}");
        }
    }

    #[test]
    fn short_and_missing_blobs_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let data = sample(8 * 4096);
        let (vol, blobs) = tree_volume(dir.path(), &data, None);
        let BlockRef::Part { blob, .. } = vol.block_ref(0).unwrap() else {
            panic!("block 0 is data");
        };
        // A blob shorter than its pieces need (the store returns what it holds).
        blobs.set_raw(blob, BlobKind::Data, vec![1; 5000]);
        let mut b = vec![0u8; 100];
        vol.read_at(0, &mut b).unwrap();
        let e = vol.read_at(4096, &mut b).unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "{e}");
        let e = vol.read_at(4096 + 1000, &mut b).unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "{e}");
        // A snapshot opened without its blob store.
        let snap = SnapshotFile::open(vol.snapshot().path(), None).unwrap();
        let chunks = ChunkStore::new(dir.path().join("chunks"), HashAlgorithm::Blake3, false);
        let bare = SnapshotVolume::new(snap, chunks);
        assert!(bare.read_at(0, &mut b).is_err());
        // A blob the store lacks.
        blobs.map.lock().unwrap().remove(&blob);
        let (vol2, _) = {
            let snap = vol.snapshot().clone();
            let chunks = ChunkStore::new(dir.path().join("chunks"), HashAlgorithm::Blake3, false);
            (SnapshotVolume::new(snap, chunks), ())
        };
        assert!(vol2.read_at(0, &mut b).is_err());
    }
}
