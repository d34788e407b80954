//! The backup's stage: what the scan's workers do to each block (the read side is
//! [`crate::scan`]). A block is zero, unchanged since the parent, a duplicate of a stored chunk
//! or of a pack slot this backup wrote ([`PackedIndex`]), or new: the new blocks of a run are
//! compressed together into one pack chunk. An existing chunk is referred to again only when
//! it passes the cheap check, remembered per chunk ([`Verdicts`]).

use crate::error::{Error, Result, chain};
use crate::hash::ChunkId;
use crate::progress::Progress;
use crate::repo::Repository;
use crate::repo::chunks::{ChunkHealth, ChunkStore, Encoder};
use crate::repo::format::{BlockRef, MAX_PACK_BLOCKS};
use crate::repo::snapshot::{BlockCursor, SnapshotFile};
use crate::scan::{Input, Stage};
use crate::source::Source;
use crate::volume::{Volume, is_zero};
use std::sync::atomic::{AtomicU64, Ordering};

/// What became of a block (see [`Done`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Zero,
    Unused,
    Unchanged,
    Deduplicated,
    /// Stored now: `raw` bytes of content, `stored` bytes and `chunks` chunk files written
    /// (a pack counts on its first block, its other blocks add 0 and 0).
    New {
        raw: u64,
        stored: u64,
        chunks: u64,
    },
}

/// A worker's result for `count` blocks with one reference (a job yields one or, for a run
/// of blocks, several).
#[derive(Debug)]
pub(super) struct Done {
    pub block_ref: BlockRef,
    pub outcome: Outcome,
    pub count: u64,
    pub bytes_read: u64,
    /// Taken from the parent by change tracking, without reading.
    pub unread: bool,
}

impl Done {
    pub fn one(block_ref: BlockRef, outcome: Outcome, bytes_read: u64, unread: bool) -> Done {
        Done {
            block_ref,
            outcome,
            count: 1,
            bytes_read,
            unread,
        }
    }
}

/// Blocks this backup stored in packs, by content hash, so that a block met again elsewhere
/// in the volume refers to the stored copy. Bounded: past [`PACKED_INDEX_MAX`] entries new
/// blocks are no longer remembered (their duplicates are then stored again).
#[derive(Debug, Default)]
pub(super) struct PackedIndex {
    slices: std::sync::Mutex<std::collections::HashMap<ChunkId, (ChunkId, u8)>>,
}

/// About 30 MiB of index at most.
const PACKED_INDEX_MAX: usize = 1 << 19;

impl PackedIndex {
    fn get(&self, id: &ChunkId) -> Option<(ChunkId, u8)> {
        self.slices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .copied()
    }

    fn insert(&self, id: ChunkId, pack: ChunkId, index: u8) {
        let mut m = self.slices.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() < PACKED_INDEX_MAX {
            m.entry(id).or_insert((pack, index));
        }
    }
}

/// Verdicts of the cheap check of existing chunks ([`ChunkStore::check_cheap`]) that the
/// backup would reuse, so that a pack many blocks refer to is checked once. Bounded: emptied
/// when [`VERDICTS_MAX`] chunks are remembered (they are then checked again).
#[derive(Debug, Default)]
pub(super) struct Verdicts {
    good: std::sync::Mutex<std::collections::HashMap<ChunkId, bool>>,
    /// Checks that found a chunk missing or damaged (each chunk counted once while its
    /// verdict is remembered).
    failed: AtomicU64,
}

/// About 12 MiB of verdicts at most.
const VERDICTS_MAX: usize = 1 << 18;

impl Verdicts {
    /// True when chunk `id` may be referred to again: it passes the cheap check.
    pub fn reusable(&self, store: &ChunkStore, id: &ChunkId) -> Result<bool> {
        if let Some(&v) = self.lock().get(id) {
            return Ok(v);
        }
        let good = store.check_cheap(id)? == ChunkHealth::Good;
        if !good {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.set(*id, good);
        Ok(good)
    }

    /// Records a verdict (a chunk just stored is good).
    pub fn set(&self, id: ChunkId, good: bool) {
        let mut m = self.lock();
        if m.len() >= VERDICTS_MAX {
            m.clear();
        }
        m.insert(id, good);
    }

    /// Checks that found a chunk missing or damaged.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<ChunkId, bool>> {
        self.good.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The backup's work on each block (the read side is [`crate::scan`]).
pub(super) struct BackupStage<'a> {
    repo: &'a Repository,
    source: &'a Source,
    block_size: u64,
    parent: Option<&'a SnapshotFile>,
    zstd_level: i32,
    packed: PackedIndex,
    verdicts: Verdicts,
}

impl<'a> BackupStage<'a> {
    pub fn new(
        repo: &'a Repository,
        source: &'a Source,
        block_size: u64,
        parent: Option<&'a SnapshotFile>,
        verdicts: Verdicts,
    ) -> BackupStage<'a> {
        BackupStage {
            repo,
            source,
            block_size,
            parent,
            zstd_level: repo.config().zstd_level,
            packed: PackedIndex::default(),
            verdicts,
        }
    }

    /// Healing is not silent: damage found in the repository is named, so that the user runs
    /// `verify` (other snapshots may refer to chunks no source holds any more).
    pub fn warn_healed(&self, progress: &dyn Progress) {
        let failed = self.verdicts.failed();
        if failed > 0 {
            progress.warn(&format!(
                "{failed} existing chunk(s) that this backup would have reused were missing or \
                 damaged; their blocks were stored again (this also repairs older snapshots that \
                 refer to the same content). Run `volback verify --read-data` on the repository \
                 (docs/REPAIR.md)"
            ));
        }
    }

    /// Classifies one block read from the source against the parent and the repository:
    /// zero, unchanged, deduplicated, or `None` when its content must be stored (its hash
    /// is returned with it).
    fn classify(
        &self,
        data: &[u8],
        parent: Option<BlockRef>,
    ) -> Result<std::result::Result<(BlockRef, Outcome), ChunkId>> {
        if is_zero(data) {
            return Ok(Ok((BlockRef::Zero, Outcome::Zero)));
        }
        let store = self.repo.chunks();
        let id = self.repo.config().chunk_hash.hash(data);
        // The parent's chunk (or pack) must still be there and pass the cheap check: a lost
        // or damaged chunk is stored again instead of being carried into the new snapshot.
        if let Some(p) = parent.filter(|p| p.content_hash() == Some(id))
            && let Some(c) = p.chunk()
            && self.verdicts.reusable(store, &c)?
        {
            return Ok(Ok((p, Outcome::Unchanged)));
        }
        if store.is_present(&id)? {
            return Ok(Ok((BlockRef::Chunk(id), Outcome::Deduplicated)));
        }
        if let Some((pack, index)) = self.packed.get(&id) {
            let r = BlockRef::Slice {
                hash: id,
                pack,
                index,
            };
            return Ok(Ok((r, Outcome::Deduplicated)));
        }
        Ok(Err(id))
    }

    /// Stores one block read from the source (or compares it with the parent's).
    fn data(&self, encoder: &mut Encoder, data: &[u8], parent: Option<BlockRef>) -> Result<Done> {
        let bytes_read = data.len() as u64;
        let (block_ref, outcome) = match self.classify(data, parent)? {
            Ok(known) => known,
            Err(id) => {
                let enc = encoder.encode(data);
                self.repo.chunks().put(&id, &enc)?;
                let outcome = Outcome::New {
                    raw: bytes_read,
                    stored: enc.len() as u64,
                    chunks: 1,
                };
                (BlockRef::Chunk(id), outcome)
            }
        };
        Ok(Done::one(block_ref, outcome, bytes_read, false))
    }

    /// Stores a run of consecutive blocks read in one request: the blocks that must be
    /// stored go into one pack chunk, compressed together (a lone one becomes a plain chunk).
    fn run(
        &self,
        encoder: &mut Encoder,
        index: u64,
        data: &[u8],
        hints: Vec<Option<BlockRef>>,
    ) -> Result<Vec<Done>> {
        let bs = self.block_size as usize;
        let mut out = Vec::with_capacity(hints.len());
        // Blocks to store: (position in the run, content hash), first occurrence only.
        let mut fresh: Vec<(usize, ChunkId)> = Vec::new();
        // Position in `out` of each block that waits for the pack, with its slot in `fresh`.
        let mut waiting: Vec<(usize, usize)> = Vec::new();
        for (i, hint) in hints.into_iter().enumerate() {
            let Some(block) = data.get(i * bs..((i + 1) * bs).min(data.len())) else {
                return Err(Error::internal(
                    "backup",
                    format!("run at block {index} is shorter than its {} blocks", i + 1),
                ));
            };
            match self.classify(block, hint)? {
                Ok((r, outcome)) => out.push(Done::one(r, outcome, block.len() as u64, false)),
                Err(id) => {
                    let slot = match fresh.iter().position(|(_, h)| *h == id) {
                        Some(slot) => slot,
                        None => {
                            fresh.push((i, id));
                            fresh.len() - 1
                        }
                    };
                    waiting.push((out.len(), slot));
                    out.push(Done::one(
                        BlockRef::Zero,
                        Outcome::Zero,
                        block.len() as u64,
                        false,
                    ));
                }
            }
        }
        if fresh.is_empty() {
            return Ok(out);
        }
        let block = |i: usize| &data[i * bs..((i + 1) * bs).min(data.len())];
        if fresh.len() == 1 {
            let (i, id) = fresh[0];
            let enc = encoder.encode(block(i));
            self.repo.chunks().put(&id, &enc)?;
            let mut first = true;
            for &(pos, _) in &waiting {
                out[pos].block_ref = BlockRef::Chunk(id);
                out[pos].outcome = if std::mem::take(&mut first) {
                    Outcome::New {
                        raw: block(i).len() as u64,
                        stored: enc.len() as u64,
                        chunks: 1,
                    }
                } else {
                    Outcome::Deduplicated
                };
            }
            return Ok(out);
        }
        // The pack's content: the fresh blocks in order, without copying when they are the
        // run's first blocks back to back (the common case of a full backup).
        let contiguous = fresh.iter().enumerate().all(|(k, &(i, _))| k == i);
        let content: std::borrow::Cow<'_, [u8]> = if contiguous {
            let (last, _) = fresh[fresh.len() - 1];
            std::borrow::Cow::Borrowed(&data[..(last * bs + block(last).len())])
        } else {
            let mut v = Vec::with_capacity(fresh.len() * bs);
            for &(i, _) in &fresh {
                v.extend_from_slice(block(i));
            }
            std::borrow::Cow::Owned(v)
        };
        let store = self.repo.chunks();
        let pack = self.repo.config().chunk_hash.hash(&content);
        // The same pack may be stored already: the same run of an identical volume, or of
        // this volume after its parent lost the pack. A damaged pack file is replaced, which
        // repairs the snapshots that refer to it.
        let (stored, chunks) = if store.is_present(&pack)? {
            (0, 0)
        } else {
            let enc = encoder.encode(&content);
            store.put(&pack, &enc)?;
            self.verdicts.set(pack, true);
            (enc.len() as u64, 1)
        };
        let existed = chunks == 0;
        for (slot, &(_, id)) in fresh.iter().enumerate() {
            self.packed.insert(id, pack, slot as u8);
        }
        let mut stored_once = vec![false; fresh.len()];
        let mut first = true;
        for &(pos, slot) in &waiting {
            let (i, id) = fresh[slot];
            out[pos].block_ref = BlockRef::Slice {
                hash: id,
                pack,
                index: slot as u8,
            };
            out[pos].outcome = if existed || std::mem::replace(&mut stored_once[slot], true) {
                Outcome::Deduplicated
            } else {
                let first = std::mem::take(&mut first);
                Outcome::New {
                    raw: block(i).len() as u64,
                    stored: if first { stored } else { 0 },
                    chunks: if first { chunks } else { 0 },
                }
            };
        }
        Ok(out)
    }
}

impl<'a> Stage for BackupStage<'a> {
    /// The parent snapshot's reference for the block.
    type Hint = Option<BlockRef>;
    /// The parent's references, streamed; set when they became unreadable.
    type Hints = (Option<BlockCursor<'a>>, bool);
    type Worker = Encoder;
    type Out = Vec<Done>;

    fn hints(&self) -> Self::Hints {
        (self.parent.map(BlockCursor::new), false)
    }

    fn whole_runs(&self) -> Option<u64> {
        // Packs hold at most MAX_PACK_BLOCKS blocks (a one-byte index); a pack of one block
        // is a plain chunk, and runs of one block would only make read requests smaller.
        let n = (u64::from(self.repo.config().pack_size) / self.block_size).min(MAX_PACK_BLOCKS);
        (n > 1).then_some(n)
    }

    fn hint(
        &self,
        hints: &mut Self::Hints,
        block: u64,
        progress: &dyn Progress,
    ) -> Option<BlockRef> {
        let (cursor, failed) = hints;
        match cursor.as_mut() {
            Some(c) if !*failed => match c.get(block) {
                Ok(r) => r,
                Err(e) => {
                    *failed = true;
                    progress.warn(&format!(
                        "parent snapshot unreadable from block {block} on ({}); comparing \
                         with stored chunks instead",
                        chain(&e)
                    ));
                    None
                }
            },
            _ => None,
        }
    }

    fn worker(&self) -> Result<Encoder> {
        Encoder::new(self.zstd_level)
    }

    fn process(
        &self,
        encoder: &mut Encoder,
        index: u64,
        count: u64,
        input: Input<Option<BlockRef>>,
    ) -> Result<Vec<Done>> {
        let run = |block_ref, outcome| Done {
            block_ref,
            outcome,
            count,
            bytes_read: 0,
            unread: false,
        };
        Ok(vec![match input {
            Input::Hole => run(BlockRef::Zero, Outcome::Zero),
            Input::Unused => run(BlockRef::Unused, Outcome::Unused),
            Input::Data { buf, hint } => self.data(encoder, &buf, hint)?,
            Input::Run { buf, hints } => return self.run(encoder, index, &buf, hints),
            Input::Known { hint } => match hint {
                Some(r)
                    if let Some(c) = r.chunk()
                        && self.verdicts.reusable(self.repo.chunks(), &c)? =>
                {
                    Done::one(r, Outcome::Unchanged, 0, true)
                }
                Some(BlockRef::Zero) => Done::one(BlockRef::Zero, Outcome::Zero, 0, true),
                // The parent does not hold the block after all (or its chunk is missing or
                // damaged since `drop_unreusable` checked it): read it.
                other => {
                    let start = index * self.block_size;
                    let len = self.block_size.min(self.source.size() - start) as usize;
                    let mut data = vec![0u8; len];
                    self.source.read_at(start, &mut data)?;
                    self.data(encoder, &data, other)?
                }
            },
        }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::InitOptions;

    fn id(n: u64) -> ChunkId {
        let mut b = [0u8; 32];
        b[..8].copy_from_slice(&n.to_le_bytes());
        b[31] = 0x5a;
        ChunkId(b)
    }

    fn repo(dir: &tempfile::TempDir) -> Repository {
        Repository::init(&dir.path().join("repo"), &InitOptions::default()).unwrap()
    }

    #[test]
    fn packed_index_keeps_the_first_slot_of_a_content() {
        let p = PackedIndex::default();
        assert_eq!(p.get(&id(1)), None);
        p.insert(id(1), id(100), 3);
        p.insert(id(1), id(200), 4);
        assert_eq!(p.get(&id(1)), Some((id(100), 3)));
        assert_eq!(p.get(&id(2)), None);
    }

    #[test]
    fn packed_index_is_bounded() {
        let p = PackedIndex::default();
        for n in 0..PACKED_INDEX_MAX as u64 + 10 {
            p.insert(id(n), id(0), 0);
        }
        assert!(p.get(&id(PACKED_INDEX_MAX as u64 - 1)).is_some());
        // Past the bound new blocks are not remembered; the old ones stay.
        assert_eq!(p.get(&id(PACKED_INDEX_MAX as u64)), None);
        assert!(p.get(&id(0)).is_some());
    }

    #[test]
    fn verdicts_check_each_chunk_once_and_count_failures_once() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(&dir);
        let store = repo.chunks();
        let data = vec![7u8; 4096];
        let present = repo.config().chunk_hash.hash(&data);
        let mut encoder = Encoder::new(3).unwrap();
        let enc = encoder.encode(&data);
        store.put(&present, &enc).unwrap();
        let v = Verdicts::default();
        assert!(v.reusable(store, &present).unwrap());
        assert!(!v.reusable(store, &id(9)).unwrap());
        assert_eq!(v.failed(), 1);
        // Remembered: a missing chunk is not counted again.
        assert!(!v.reusable(store, &id(9)).unwrap());
        assert_eq!(v.failed(), 1);
        // The verdict is remembered even once the chunk is gone.
        std::fs::remove_file(store.path(&present)).unwrap();
        assert!(v.reusable(store, &present).unwrap());
        // A chunk just stored is good.
        v.set(id(9), true);
        assert!(v.reusable(store, &id(9)).unwrap());
        assert_eq!(v.failed(), 1);
    }

    #[test]
    fn verdicts_are_forgotten_past_their_bound() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(&dir);
        let v = Verdicts::default();
        v.set(id(u64::MAX), true);
        for n in 0..VERDICTS_MAX as u64 {
            v.set(id(n), true);
        }
        // The map was emptied when full: the first verdict is gone and the missing chunk
        // is checked again.
        assert!(!v.reusable(repo.chunks(), &id(u64::MAX)).unwrap());
        assert_eq!(v.failed(), 1);
        assert!(v.lock().len() <= VERDICTS_MAX);
    }
}
