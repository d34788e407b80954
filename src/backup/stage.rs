//! The backup's stage: what the scan's workers do to each run of blocks (the read side is
//! [`crate::scan`]), for repository format 2 (docs/FORMAT.md §F2, docs/ARCHITECTURE.md "Content-defined blobs").
//!
//! A run of consecutive blocks read in one request is cut into blobs ([`Chunker`]): zero
//! blocks are in no blob, the other blocks are cut where their content says so. Each blob is
//! hashed; a blob the writer's index already holds (the parent's, another volume's, one a
//! concurrent backup or another worker just stored) is referred to again, the others are new:
//! consecutive new blobs of the run are grouped into frames of at most [`FRAME_RAW`] bytes,
//! each compressed (and, in an encrypted repository, sealed) once by the worker and appended to
//! a pack by the [`Packer`]. Every block becomes a piece
//! of its blob ([`BlockRef::Part`]).
//!
//! Blocks change tracking knows to be unchanged since the parent are taken from it unread
//! when the parent's blob is still in the index; otherwise they are read and stored like the
//! others. There are no per-block hashes in format 2: "unchanged" for a block that was read
//! means its blob is the very blob the parent had at the same place.

use super::chunker::Chunker;
use crate::error::{Error, Result, chain};
use crate::hash::ChunkId;
use crate::progress::Progress;
use crate::repo::blob::BlobKind;
use crate::repo::blobs::BlobStore;
use crate::repo::format::BlockRef;
use crate::repo::pack::FrameEncoder;
use crate::repo::packer::Packer;
use crate::repo::seal::Sealer;
use crate::repo::snapshot::{BlockCursor, SnapshotFile};
use crate::scan::{Input, Stage};
use crate::volume::{Volume, is_zero};
use std::collections::HashSet;
use std::ops::Range;

/// Largest raw content of a frame of data blobs (1 MiB): what a reader of one block may have
/// to decompress. A blob larger than that (one block of more than 1 MiB) is alone in its
/// frame.
pub(super) const FRAME_RAW: usize = 1 << 20;

/// Largest read request of a backup: 16 MiB (4096 blocks of 4 KiB). Runs end where a blob
/// must be cut, so larger runs cut fewer blobs at arbitrary places; see
/// [`crate::scan::whole_run_blocks`] for the memory bound.
pub(super) const RUN_BYTES: u64 = 16 << 20;

/// What became of a block or a run of blocks (see [`Done`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Zero,
    Unused,
    /// The same blob as the parent's at the same place.
    Unchanged,
    /// A blob the repository (or this backup) held already.
    Deduplicated,
    /// A new blob of `raw` bytes. A frame's `stored` bytes and its count (`chunks` = 1) go
    /// with its first blob; its other blobs add 0 and 0.
    New {
        raw: u64,
        stored: u64,
        chunks: u64,
    },
}

/// A worker's result for `count` blocks with one reference (a PART reference: pieces
/// `index .. index + count` of its blob). A job yields one or several.
#[derive(Debug)]
pub(super) struct Done {
    pub block_ref: BlockRef,
    pub outcome: Outcome,
    pub count: u64,
    pub bytes_read: u64,
    /// Taken from the parent by change tracking, without reading.
    pub unread: bool,
}

#[cfg(test)]
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

/// Where the stage finds and stores blobs: the writer's [`BlobStore`] and [`Packer`] (tests use
/// an in-memory one).
pub(super) trait Blobs: Sync {
    /// True when blob `id` may be referred to (it is in the writer's usable index, or was
    /// added by this backup).
    fn contains(&self, id: &ChunkId) -> bool;
    /// Appends one stored frame ([`FrameEncoder::encode`]) of `raw_len` raw bytes holding
    /// `blobs`; returns the bytes written.
    fn add_frame(
        &self,
        stored: &[u8],
        raw_len: u32,
        blobs: &[(ChunkId, BlobKind, u32, u32)],
    ) -> Result<u64>;
}

/// The repository's blobs as a writer sees them.
pub(super) struct RepoBlobs<'a> {
    pub store: &'a BlobStore,
    pub packer: &'a Packer,
}

impl Blobs for RepoBlobs<'_> {
    fn contains(&self, id: &ChunkId) -> bool {
        self.store.usable(id)
    }

    fn add_frame(
        &self,
        stored: &[u8],
        raw_len: u32,
        blobs: &[(ChunkId, BlobKind, u32, u32)],
    ) -> Result<u64> {
        self.packer.add_frame(stored, raw_len, blobs)
    }
}

/// Per-worker state: the compressor (and sealer) and reused buffers.
pub(super) struct Worker {
    encoder: FrameEncoder,
    /// Raw content of the frame being built.
    frame: Vec<u8>,
}

/// The backup's work on each run of blocks (the read side is [`crate::scan`]).
pub(super) struct BackupStage<'a> {
    source: &'a dyn Volume,
    block_size: u64,
    parent: Option<&'a SnapshotFile>,
    blobs: &'a dyn Blobs,
    /// Names blobs ([`Sealer::blob_id`]) and seals frames.
    sealer: &'a Sealer,
    zstd_level: i32,
    chunker: Chunker,
}

/// A new blob waiting for its frame: its result's position, id and bytes in the run.
struct Pending {
    out: usize,
    id: ChunkId,
    bytes: Range<usize>,
}

impl<'a> BackupStage<'a> {
    pub fn new(
        source: &'a dyn Volume,
        block_size: u64,
        parent: Option<&'a SnapshotFile>,
        blobs: &'a dyn Blobs,
        sealer: &'a Sealer,
        zstd_level: i32,
    ) -> BackupStage<'a> {
        BackupStage {
            source,
            block_size,
            parent,
            blobs,
            sealer,
            zstd_level,
            chunker: Chunker::new(block_size).with_seed(sealer.chunker_seed()),
        }
    }

    /// Stores a run of consecutive blocks starting at block `index`, read in one request
    /// (`data`), with the parent's reference of each block (`hints`).
    fn run(
        &self,
        worker: &mut Worker,
        index: u64,
        data: &[u8],
        hints: &[Option<BlockRef>],
    ) -> Result<Vec<Done>> {
        let bs = self.block_size as usize;
        let n = hints.len();
        let span = |r: Range<usize>| (r.start * bs).min(data.len())..(r.end * bs).min(data.len());
        if n == 0 || (n - 1) * bs >= data.len() {
            return Err(Error::internal(
                "backup",
                format!(
                    "run at block {index} of {n} blocks has {} bytes",
                    data.len()
                ),
            ));
        }
        let stored: Vec<bool> = (0..n).map(|i| !is_zero(&data[span(i..i + 1)])).collect();
        let blobs = self.chunker.blobs(&stored, |i| &data[span(i..i + 1)]);
        let mut out = Vec::with_capacity(blobs.len() + 2);
        let mut fresh: HashSet<ChunkId> = HashSet::new();
        let mut frame: Vec<Pending> = Vec::new();
        let mut frame_raw = 0usize;
        let mut pos = 0usize;
        let zeros = |out: &mut Vec<Done>, r: Range<usize>| {
            if r.start < r.end {
                out.push(Done {
                    block_ref: BlockRef::Zero,
                    outcome: Outcome::Zero,
                    count: (r.end - r.start) as u64,
                    bytes_read: span(r).len() as u64,
                    unread: false,
                });
            }
        };
        for r in blobs {
            zeros(&mut out, pos..r.start);
            pos = r.end;
            let bytes = span(r.clone());
            let id = self.sealer.blob_id(&data[bytes.clone()]);
            let block_ref = BlockRef::Part { blob: id, index: 0 };
            let count = (r.end - r.start) as u64;
            let len = bytes.len();
            if fresh.contains(&id) || self.blobs.contains(&id) {
                let same_as_parent =
                    (0..count).all(|k| hints[r.start + k as usize] == Some(block_ref.advance(k)));
                out.push(Done {
                    block_ref,
                    outcome: if same_as_parent {
                        Outcome::Unchanged
                    } else {
                        Outcome::Deduplicated
                    },
                    count,
                    bytes_read: len as u64,
                    unread: false,
                });
                continue;
            }
            if !frame.is_empty() && frame_raw + len > FRAME_RAW {
                self.flush(worker, data, &mut frame, &mut out)?;
                frame_raw = 0;
            }
            fresh.insert(id);
            frame.push(Pending {
                out: out.len(),
                id,
                bytes,
            });
            frame_raw += len;
            out.push(Done {
                block_ref,
                outcome: Outcome::New {
                    raw: len as u64,
                    stored: 0,
                    chunks: 0,
                },
                count,
                bytes_read: len as u64,
                unread: false,
            });
        }
        zeros(&mut out, pos..n);
        self.flush(worker, data, &mut frame, &mut out)?;
        Ok(out)
    }

    /// Compresses the blobs of `frame` as one frame and appends it to a pack; its size goes
    /// to the first blob's outcome.
    fn flush(
        &self,
        worker: &mut Worker,
        data: &[u8],
        frame: &mut Vec<Pending>,
        out: &mut [Done],
    ) -> Result<()> {
        let Some(first) = frame.first() else {
            return Ok(());
        };
        let first_out = first.out;
        let Worker {
            encoder,
            frame: raw,
        } = worker;
        raw.clear();
        let mut table = Vec::with_capacity(frame.len());
        for p in frame.iter() {
            let off = raw.len() as u32;
            raw.extend_from_slice(&data[p.bytes.clone()]);
            table.push((p.id, BlobKind::Data, off, p.bytes.len() as u32));
        }
        let stored = encoder.encode(raw)?;
        let written = self.blobs.add_frame(stored, raw.len() as u32, &table)?;
        if let Outcome::New { raw, .. } = out[first_out].outcome {
            out[first_out].outcome = Outcome::New {
                raw,
                stored: written,
                chunks: 1,
            };
        }
        frame.clear();
        Ok(())
    }

    /// Blocks change tracking knows to be unchanged since the parent, from block `index`:
    /// taken from the parent while its blob is usable, read and stored otherwise.
    fn known(
        &self,
        worker: &mut Worker,
        index: u64,
        hints: &[Option<BlockRef>],
    ) -> Result<Vec<Done>> {
        let usable = |h: Option<BlockRef>| match h {
            Some(BlockRef::Part { blob, .. }) => self.blobs.contains(&blob),
            Some(BlockRef::Zero) => true,
            _ => false,
        };
        let mut out = Vec::new();
        let mut i = 0usize;
        while i < hints.len() {
            let h = hints[i];
            let mut c = 1usize;
            match h {
                Some(r) if usable(h) => {
                    // A run of pieces of one blob (or of zeros) is one result.
                    while i + c < hints.len() && hints[i + c] == Some(r.advance(c as u64)) {
                        c += 1;
                    }
                    let outcome = if r == BlockRef::Zero {
                        Outcome::Zero
                    } else {
                        Outcome::Unchanged
                    };
                    out.push(Done {
                        block_ref: r,
                        outcome,
                        count: c as u64,
                        bytes_read: 0,
                        unread: true,
                    });
                }
                // The parent does not hold the block after all, or its blob is no longer
                // usable: read it (with its unusable neighbours, as one run).
                _ => {
                    while i + c < hints.len() && !usable(hints[i + c]) {
                        c += 1;
                    }
                    let first = index + i as u64;
                    let start = first * self.block_size;
                    let end = ((first + c as u64) * self.block_size).min(self.source.size());
                    let mut data = vec![0u8; end.saturating_sub(start) as usize];
                    self.source.read_at(start, &mut data)?;
                    out.extend(self.run(worker, first, &data, &hints[i..i + c])?);
                }
            }
            i += c;
        }
        Ok(out)
    }
}

impl<'a> Stage for BackupStage<'a> {
    /// The parent snapshot's reference for the block.
    type Hint = Option<BlockRef>;
    /// The parent's references, streamed; set when they became unreadable.
    type Hints = (Option<BlockCursor<'a>>, bool);
    type Worker = Worker;
    type Out = Vec<Done>;

    fn hints(&self) -> Self::Hints {
        (self.parent.map(BlockCursor::new), false)
    }

    fn whole_runs(&self) -> Option<u64> {
        Some((RUN_BYTES / self.block_size.max(1)).max(1))
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
                         with the repository's blobs instead",
                        chain(&e)
                    ));
                    None
                }
            },
            _ => None,
        }
    }

    fn worker(&self) -> Result<Worker> {
        Ok(Worker {
            encoder: FrameEncoder::new(self.zstd_level, self.sealer)?,
            frame: Vec::new(),
        })
    }

    fn process(
        &self,
        worker: &mut Worker,
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
        match input {
            Input::Hole => Ok(vec![run(BlockRef::Zero, Outcome::Zero)]),
            Input::Unused => Ok(vec![run(BlockRef::Unused, Outcome::Unused)]),
            Input::Data { buf, hint } => self.run(worker, index, &buf, &[hint]),
            Input::Run { buf, hints } => self.run(worker, index, &buf, &hints),
            Input::Known { hints } => self.known(worker, index, &hints),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// Blobs in memory: the frames added, opened and decoded back into their blobs.
    struct Mem {
        blobs: Mutex<HashMap<ChunkId, Vec<u8>>>,
        frames: Mutex<Vec<usize>>,
        sealer: Sealer,
    }

    impl Mem {
        fn new(sealer: Sealer) -> Mem {
            Mem {
                blobs: Mutex::default(),
                frames: Mutex::default(),
                sealer,
            }
        }
    }

    /// A plain and an encrypted sealer: every test runs with both.
    fn sealers() -> [Sealer; 2] {
        [
            Sealer::plain(crate::hash::HashAlgorithm::Blake3),
            crate::repo::seal::testing::encrypted("99"),
        ]
    }

    impl Blobs for Mem {
        fn contains(&self, id: &ChunkId) -> bool {
            self.blobs.lock().unwrap().contains_key(id)
        }
        fn add_frame(
            &self,
            stored: &[u8],
            raw_len: u32,
            blobs: &[(ChunkId, BlobKind, u32, u32)],
        ) -> Result<u64> {
            let mut raw = Vec::new();
            let encoded = self
                .sealer
                .open(
                    crate::crypto::Kind::Frame,
                    b"",
                    stored,
                    "frame",
                    "mem".as_ref(),
                )
                .unwrap();
            assert_eq!(encoded.len() + self.sealer.overhead(), stored.len());
            crate::repo::chunks::decode_encoded(&encoded, "frame", "mem".as_ref(), &mut raw)
                .unwrap();
            assert_eq!(raw.len(), raw_len as usize);
            let mut m = self.blobs.lock().unwrap();
            let mut end = 0;
            for &(id, kind, off, len) in blobs {
                assert_eq!(kind, BlobKind::Data);
                assert_eq!(off as usize, end, "blobs back to back");
                end += len as usize;
                let b = raw[off as usize..end].to_vec();
                assert_eq!(self.sealer.blob_id(&b), id);
                m.insert(id, b);
            }
            assert_eq!(end, raw.len());
            assert!(raw.len() <= FRAME_RAW);
            self.frames.lock().unwrap().push(blobs.len());
            Ok(stored.len() as u64)
        }
    }

    struct Bytes(Vec<u8>);

    impl Volume for Bytes {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            let o = offset as usize;
            buf.copy_from_slice(&self.0[o..o + buf.len()]);
            Ok(())
        }
        fn describe(&self) -> String {
            "bytes".into()
        }
    }

    const BS: usize = 4096;

    /// `blocks` blocks of pseudo-random content from `seed`; blocks in `zero` are zeros.
    fn volume(blocks: usize, seed: u64, zero: &[usize]) -> Vec<u8> {
        let mut v = vec![0u8; blocks * BS];
        let mut x = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
        for (i, b) in v.iter_mut().enumerate() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if !zero.contains(&(i / BS)) {
                *b = x as u8;
            }
        }
        v
    }

    fn stage<'a>(src: &'a Bytes, mem: &'a Mem) -> BackupStage<'a> {
        BackupStage::new(src, BS as u64, None, mem, &mem.sealer, 1)
    }

    fn worker(mem: &Mem) -> Worker {
        Worker {
            encoder: FrameEncoder::new(1, &mem.sealer).unwrap(),
            frame: Vec::new(),
        }
    }

    /// The content the results describe, rebuilt from the stored blobs.
    fn rebuild(mem: &Mem, out: &[Done]) -> Vec<u8> {
        let m = mem.blobs.lock().unwrap();
        let mut v = Vec::new();
        for d in out {
            match d.block_ref {
                BlockRef::Zero => v.resize(v.len() + d.count as usize * BS, 0),
                BlockRef::Part { blob, index } => {
                    let b = &m[&blob];
                    let s = index as usize * BS;
                    let e = (s + d.count as usize * BS).min(b.len());
                    v.extend_from_slice(&b[s..e]);
                }
                r => panic!("unexpected {r:?}"),
            }
        }
        v
    }

    #[test]
    fn a_run_is_stored_as_blobs_in_frames_and_rebuilds() {
        for sealer in sealers() {
            let data = volume(600, 1, &[3, 4, 5, 100, 599]);
            let src = Bytes(data.clone());
            let mem = Mem::new(sealer.clone());
            let st = stage(&src, &mem);
            let hints = vec![None; 600];
            let out = st.run(&mut worker(&mem), 0, &data, &hints).unwrap();
            assert_eq!(out.iter().map(|d| d.count).sum::<u64>(), 600);
            assert_eq!(rebuild(&mem, &out), data);
            let zero: u64 = out
                .iter()
                .filter(|d| d.outcome == Outcome::Zero)
                .map(|d| d.count)
                .sum();
            assert_eq!(zero, 5);
            // Several blobs, several frames, each counted once.
            let frames = mem.frames.lock().unwrap().clone();
            let (mut raw, mut chunks) = (0, 0);
            for d in &out {
                if let Outcome::New {
                    raw: r, chunks: c, ..
                } = d.outcome
                {
                    raw += r;
                    chunks += c;
                    assert!(d.count <= 64);
                }
            }
            assert_eq!(raw, 595 * BS as u64);
            assert_eq!(chunks as usize, frames.len());
            assert!(frames.len() >= 3, "{frames:?}");
            assert!(out.len() > 10);

            // The same run again: every blob is deduplicated, nothing is written.
            let again = st.run(&mut worker(&mem), 0, &data, &hints).unwrap();
            assert!(
                again
                    .iter()
                    .all(|d| matches!(d.outcome, Outcome::Deduplicated | Outcome::Zero))
            );
            assert_eq!(mem.frames.lock().unwrap().len(), frames.len());
            // With the first result as the parent's references: unchanged.
            let parent: Vec<Option<BlockRef>> = out
                .iter()
                .flat_map(|d| (0..d.count).map(move |k| Some(d.block_ref.advance(k))))
                .collect();
            let third = st.run(&mut worker(&mem), 0, &data, &parent).unwrap();
            assert!(
                third
                    .iter()
                    .all(|d| matches!(d.outcome, Outcome::Unchanged | Outcome::Zero))
            );
        }
    }

    #[test]
    fn identical_blobs_of_one_run_are_stored_once() {
        for sealer in sealers() {
            let one = volume(40, 7, &[]);
            let mut data = one.clone();
            data.extend_from_slice(&volume(1, 99, &[0]));
            data.extend_from_slice(&one);
            let src = Bytes(data.clone());
            let mem = Mem::new(sealer.clone());
            let st = stage(&src, &mem);
            let out = st
                .run(&mut worker(&mem), 0, &data, &vec![None; 81])
                .unwrap();
            assert_eq!(rebuild(&mem, &out), data);
            let new: u64 = out
                .iter()
                .filter_map(|d| match d.outcome {
                    Outcome::New { raw, .. } => Some(raw),
                    _ => None,
                })
                .sum();
            assert_eq!(new, 40 * BS as u64);
        }
    }

    #[test]
    fn a_short_last_block_is_kept() {
        for sealer in sealers() {
            let mut data = volume(3, 5, &[]);
            data.truncate(2 * BS + 100);
            let src = Bytes(data.clone());
            let mem = Mem::new(sealer.clone());
            let st = stage(&src, &mem);
            let out = st.run(&mut worker(&mem), 0, &data, &[None; 3]).unwrap();
            assert_eq!(rebuild(&mem, &out), data);
            assert!(st.run(&mut worker(&mem), 0, &data, &[None; 4]).is_err());
        }
    }

    #[test]
    fn known_blocks_are_taken_unread_while_their_blob_is_usable() {
        for sealer in sealers() {
            let data = volume(100, 3, &[10]);
            let src = Bytes(data.clone());
            let mem = Mem::new(sealer.clone());
            let st = stage(&src, &mem);
            let first = st
                .run(&mut worker(&mem), 0, &data, &vec![None; 100])
                .unwrap();
            let mut parent: Vec<Option<BlockRef>> = first
                .iter()
                .flat_map(|d| (0..d.count).map(move |k| Some(d.block_ref.advance(k))))
                .collect();
            let out = st.known(&mut worker(&mem), 0, &parent).unwrap();
            assert!(out.iter().all(|d| d.unread && d.bytes_read == 0));
            assert_eq!(rebuild(&mem, &out), data);
            // A lost blob: its blocks are read and stored again; unknown ones too.
            let lost = parent[50].unwrap().blob().unwrap();
            mem.blobs.lock().unwrap().remove(&lost);
            parent[90] = None;
            let out = st.known(&mut worker(&mem), 0, &parent).unwrap();
            assert_eq!(out.iter().map(|d| d.count).sum::<u64>(), 100);
            assert!(out.iter().any(|d| !d.unread && d.bytes_read > 0));
            assert!(mem.contains(&lost));
            assert_eq!(rebuild(&mem, &out), data);
        }
    }
}
