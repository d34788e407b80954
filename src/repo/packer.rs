//! The packer: appends frames to pack files during a backup or a repack, and makes them
//! durable and indexed at checkpoints.
//!
//! Frames go into one open pack (under a mutex: frames are compressed, and sealed in an
//! encrypted repository, by the callers' threads ([`FrameEncoder`]); only the append is
//! serialised), except tree nodes, which go into a second open pack of their own: a snapshot's
//! tree is then read from a few packs that hold nothing else (one request each on object
//! storage) instead of a frame here and there in every data pack. A pack is finished when it
//! reaches the repository's `pack_size`. A checkpoint finishes the open pack, syncs the filesystem (so every pack is
//! durable before anything names it) and writes one index file for the packs finished since
//! the previous checkpoint; then it loads index files other writers wrote meanwhile.

use super::Repository;
use super::backend::{Fence, WriteBackend};
use super::blob::{BlobEntry, BlobKind, BlobSink};
use super::blobs::BlobStore;
use super::format::MAX_FRAME_RAW;
use super::index::IndexFile;
use super::pack::{FrameEncoder, PackWriter};
use super::seal::Sealer;
use crate::error::{Error, Result};
use crate::hash::ChunkId;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Writes packs of one writer (thread-safe).
pub struct Packer {
    store: Arc<BlobStore>,
    backend: Arc<dyn WriteBackend>,
    pack_size: u64,
    zstd_level: i32,
    sealer: Sealer,
    state: Mutex<State>,
    packs_written: AtomicU64,
    /// For tree blobs ([`BlobSink::put_blob`]); data frames come encoded.
    encoder: Mutex<Option<FrameEncoder>>,
    /// Checked before each index file is written.
    fence: Mutex<Fence>,
}

#[derive(Debug, Default)]
struct State {
    /// The open pack of data frames.
    open: Option<PackWriter>,
    /// The open pack of frames that hold only tree blobs.
    open_tree: Option<PackWriter>,
    /// Packs finished since the last checkpoint, not yet in an index file.
    finished: Vec<(ChunkId, Vec<BlobEntry>)>,
}

impl std::fmt::Debug for Packer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Packer")
            .field("backend", &self.backend)
            .field("pack_size", &self.pack_size)
            .field("packs_written", &self.packs_written())
            .finish_non_exhaustive()
    }
}

impl Packer {
    /// A packer writing into `repo` (format 2) and recording what it writes in `store`.
    pub fn new(repo: &Repository, store: Arc<BlobStore>) -> Result<Packer> {
        repo.require_format2("write packs")?;
        Ok(Packer {
            store,
            backend: repo.backend().clone(),
            pack_size: u64::from(repo.config().pack_size),
            zstd_level: repo.config().zstd_level,
            sealer: repo.sealer().clone(),
            state: Mutex::new(State::default()),
            packs_written: AtomicU64::new(0),
            encoder: Mutex::new(None),
            fence: Mutex::new(Fence::default()),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks `fence` before every index file from now on (and [`Packer::check_fence`]).
    pub fn set_fence(&self, fence: Fence) {
        *self.fence.lock().unwrap_or_else(|p| p.into_inner()) = fence;
    }

    /// Ok while the writer's leases surely hold ([`Fence`]).
    pub fn check_fence(&self) -> Result<()> {
        let fence = self.fence.lock().unwrap_or_else(|p| p.into_inner()).clone();
        fence.check()
    }

    /// Where the packs go.
    pub fn backend(&self) -> &Arc<dyn WriteBackend> {
        &self.backend
    }

    /// How the repository stores frames ([`FrameEncoder::new`] takes it).
    pub fn sealer(&self) -> &Sealer {
        &self.sealer
    }

    /// Appends one frame as stored ([`FrameEncoder::encode`]), whose raw content is `raw_len`
    /// bytes (thread-safe); the blobs become visible to `store.contains` at once. Returns the
    /// bytes written (the stored frame's length).
    pub fn add_frame(
        &self,
        stored: &[u8],
        raw_len: u32,
        blobs: &[(ChunkId, BlobKind, u32, u32)],
    ) -> Result<u64> {
        let tree = !blobs.is_empty() && blobs.iter().all(|b| b.1 == BlobKind::Tree);
        let mut state = self.state();
        let taken = if tree {
            state.open_tree.take()
        } else {
            state.open.take()
        };
        let mut writer = match taken {
            Some(w) => w,
            None => PackWriter::create(self.backend.as_ref(), &self.sealer)?,
        };
        if let Err(e) = writer.add_frame(stored, raw_len, blobs) {
            // A failed append may have left part of a frame: this pack is abandoned (its
            // temporary file removed), its earlier blobs are forgotten.
            self.store
                .remove_unsealed(writer.entries().iter().map(|e| e.id));
            return Err(e);
        }
        self.store.add_unsealed(blobs.iter().map(|b| b.0));
        if writer.len() >= self.pack_size {
            self.seal(&mut state, writer)?;
        } else if tree {
            state.open_tree = Some(writer);
        } else {
            state.open = Some(writer);
        }
        Ok(stored.len() as u64)
    }

    /// Finishes `writer`'s pack and makes its blobs readable through the store.
    fn seal(&self, state: &mut State, writer: PackWriter) -> Result<()> {
        let ids: Vec<ChunkId> = writer.entries().iter().map(|e| e.id).collect();
        let finished = writer.finish();
        let (pack, entries) = match finished {
            Ok(f) => f,
            Err(e) => {
                self.store.remove_unsealed(ids);
                return Err(e);
            }
        };
        // Inserted before being removed from the unsealed set: `contains` never misses.
        self.store.insert(pack, &entries);
        self.store.remove_unsealed(ids);
        state.finished.push((pack, entries));
        self.packs_written.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Finishes the open pack, syncs the filesystem, writes one index file for every pack
    /// finished since the last checkpoint. After it returns, every blob added before is
    /// durable and indexed. Then loads the index files other writers wrote meanwhile.
    pub fn checkpoint(&self) -> Result<()> {
        let mut state = self.state();
        // One at a time: when the first fails, the other stays open (its blobs known).
        if let Some(writer) = state.open.take()
            && !writer.is_empty()
        {
            self.seal(&mut state, writer)?;
        }
        if let Some(writer) = state.open_tree.take()
            && !writer.is_empty()
        {
            self.seal(&mut state, writer)?;
        }
        if !state.finished.is_empty() {
            // Every pack is durable (and, on object storage, uploaded) before an index
            // file names it, and the writer is still known to be alive (a prune that judged
            // it dead may have deleted its packs as leftovers).
            self.backend.barrier()?;
            self.check_fence()?;
            let file = IndexFile {
                packs: std::mem::take(&mut state.finished),
            };
            match file.write_to(self.backend.as_ref(), "index", &self.sealer) {
                Ok(id) => self.store.mark_index_loaded(&id),
                Err(e) => {
                    state.finished = file.packs;
                    return Err(e);
                }
            }
        }
        drop(state);
        self.store.refresh()
    }

    /// Packs finished so far.
    pub fn packs_written(&self) -> u64 {
        self.packs_written.load(Ordering::Relaxed)
    }
}

impl BlobSink for Packer {
    /// Stores a blob (a tree node) in a frame of its own, unless the store already has it.
    fn put_blob(&self, kind: BlobKind, content: &[u8]) -> Result<ChunkId> {
        let id = self.sealer.blob_id(content);
        if self.store.usable(&id) {
            return Ok(id);
        }
        if content.is_empty() || content.len() > MAX_FRAME_RAW as usize {
            return Err(Error::internal(
                "packer",
                format!("a {}-byte {} blob", content.len(), kind.name()),
            ));
        }
        // Held while the frame is appended (the encoder's buffer is the frame): tree blobs
        // are few, and nothing takes this lock while holding the pack's.
        let mut enc = self.encoder.lock().unwrap_or_else(|p| p.into_inner());
        let enc = match enc.as_mut() {
            Some(e) => e,
            None => enc.insert(FrameEncoder::new(self.zstd_level, &self.sealer)?),
        };
        let len = content.len() as u32;
        self.add_frame(enc.encode(content)?, len, &[(id, kind, 0, len)])?;
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::repo::InitOptions;
    use crate::repo::blob::BlobSource;
    use crate::repo::writers;

    fn repo() -> (tempfile::TempDir, Repository) {
        let dir = tempfile::tempdir().unwrap();
        let opts = InitOptions {
            pack_size: 1 << 20,
            ..InitOptions::default()
        };
        let r = Repository::init(&dir.path().join("r"), &opts).unwrap();
        (dir, r)
    }

    /// A plain repository and an encrypted one: every test runs on both.
    fn repos() -> Vec<(tempfile::TempDir, Repository)> {
        let (d, r) = repo();
        vec![repo(), (d, r.encrypted_for_tests())]
    }

    /// `n` pseudo-random, incompressible bytes from `seed`.
    fn noise(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Stores `blobs` as one frame; returns their ids.
    fn put_frame(p: &Packer, blobs: &[Vec<u8>]) -> Vec<ChunkId> {
        let mut raw = Vec::new();
        let mut list = Vec::new();
        for b in blobs {
            let id = p.sealer().blob_id(b);
            list.push((id, BlobKind::Data, raw.len() as u32, b.len() as u32));
            raw.extend_from_slice(b);
        }
        let mut enc = FrameEncoder::new(3, p.sealer()).unwrap();
        let v = enc.encode(&raw).unwrap();
        let n = p.add_frame(v, raw.len() as u32, &list).unwrap();
        assert_eq!(n, v.len() as u64);
        list.iter().map(|l| l.0).collect()
    }

    #[test]
    fn frames_are_visible_at_once_and_readable_after_a_checkpoint() {
        for (_d, r) in repos() {
            let store = BlobStore::open_writer(&r, &[]).unwrap();
            let p = Packer::new(&r, store.clone()).unwrap();
            let blobs: Vec<Vec<u8>> = (0..6).map(|i| noise(i, 300_000)).collect();
            let mut ids = put_frame(&p, &blobs[..2]);
            assert!(ids.iter().all(|id| store.contains(id)));
            assert!(store.location(&ids[0]).is_none());
            for b in &blobs[2..] {
                ids.extend(put_frame(&p, std::slice::from_ref(b)));
            }
            // 1.8 MB in 1 MiB packs: one finished, one open.
            assert_eq!(p.packs_written(), 1);
            let tree = p.put_blob(BlobKind::Tree, &b"node".repeat(100)).unwrap();
            assert_eq!(
                p.put_blob(BlobKind::Tree, &b"node".repeat(100)).unwrap(),
                tree
            );
            p.checkpoint().unwrap();
            // The open data pack, and the tree blob's pack of its own.
            assert_eq!(p.packs_written(), 3);
            p.checkpoint().unwrap();
            assert_eq!(crate::repo::index::list_index_files(&r).unwrap().len(), 1);
            assert_eq!(std::fs::read_dir(r.tmp_dir()).unwrap().count(), 0);
            // A reader opened now finds everything, checked.
            let reader = BlobStore::open(&r).unwrap();
            for (id, b) in ids.iter().zip(&blobs) {
                assert_eq!(&reader.blob(id, BlobKind::Data).unwrap()[..], &b[..]);
            }
            assert_eq!(
                &reader.blob(&tree, BlobKind::Tree).unwrap()[..],
                &b"node".repeat(100)[..]
            );
            assert!(matches!(
                reader.blob(&tree, BlobKind::Data),
                Err(Error::Corrupt { .. })
            ));
            assert!(matches!(
                reader.blob(&ChunkId([7; 32]), BlobKind::Data),
                Err(Error::MissingChunk { .. })
            ));
            // Repository::blobs() is that reader, cached.
            let a = r.blobs().unwrap();
            assert!(Arc::ptr_eq(&a, &r.blobs().unwrap()));
            // The writer's own store sees what it wrote; a refresh picks up other writers' files.
            let other = BlobStore::open_writer(&r, &[]).unwrap();
            let p2 = Packer::new(&r, other).unwrap();
            let extra = put_frame(&p2, &[noise(99, 1000)]);
            p2.checkpoint().unwrap();
            assert!(!store.contains(&extra[0]));
            store.refresh().unwrap();
            assert!(store.contains(&extra[0]));
        }
    }

    #[test]
    fn threads_share_one_packer() {
        for (_d, r) in repos() {
            let store = BlobStore::open_writer(&r, &[]).unwrap();
            let p = Packer::new(&r, store.clone()).unwrap();
            let ids: Vec<Vec<ChunkId>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..4u64)
                    .map(|t| {
                        let p = &p;
                        s.spawn(move || {
                            (0..10u64)
                                .flat_map(|i| put_frame(p, &[noise(t * 100 + i, 70_000)]))
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            p.checkpoint().unwrap();
            assert!(p.packs_written() >= 2);
            let reader = BlobStore::open(&r).unwrap();
            for (t, list) in ids.iter().enumerate() {
                for (i, id) in list.iter().enumerate() {
                    let b = reader.blob(id, BlobKind::Data).unwrap();
                    assert_eq!(&b[..], &noise(t as u64 * 100 + i as u64, 70_000)[..]);
                }
            }
        }
    }

    #[test]
    fn damaged_blobs_name_blob_pack_and_offset() {
        for (_d, r) in repos() {
            let store = BlobStore::open_writer(&r, &[]).unwrap();
            let p = Packer::new(&r, store.clone()).unwrap();
            let ids = put_frame(&p, &[b"x".repeat(5000), b"y".repeat(5000)]);
            p.checkpoint().unwrap();
            let loc = store.location(&ids[1]).unwrap();
            let path = store.pack_path(&loc.pack);
            let mut bytes = std::fs::read(&path).unwrap();
            // A flipped byte of the frame's payload: a decode or hash error naming the pack.
            bytes[16 + 20] ^= 0x55;
            std::fs::write(&path, &bytes).unwrap();
            let reader = BlobStore::open(&r).unwrap();
            let e = reader
                .blob(&ids[1], BlobKind::Data)
                .unwrap_err()
                .to_string();
            assert!(e.contains(&loc.pack.to_hex()), "{e}");
            assert!(e.contains(&ids[1].to_hex()), "{e}");
            assert!(e.contains("offset 16"), "{e}");
        }
    }

    #[test]
    fn a_repacked_blob_is_found_after_its_pack_is_deleted() {
        for (_d, r) in repos() {
            let store = BlobStore::open_writer(&r, &[]).unwrap();
            let p = Packer::new(&r, store.clone()).unwrap();
            let keep = b"keep me".repeat(1000);
            let ids = put_frame(&p, &[b"dead".repeat(900), keep.clone()]);
            p.checkpoint().unwrap();
            let reader = BlobStore::open(&r).unwrap();
            let old = reader.location(&ids[1]).unwrap();
            // A prune repacks the live blob, writes the compacted index, condemns the old pack.
            let old_files = crate::repo::index::list_index_files(&r).unwrap();
            let p2 = Packer::new(&r, BlobStore::open_writer(&r, &[]).unwrap()).unwrap();
            put_frame(&p2, std::slice::from_ref(&keep));
            p2.checkpoint().unwrap();
            let record = writers::write_pending(&r, &[old.pack], &old_files).unwrap();
            for f in &old_files {
                std::fs::remove_file(r.index_dir().join(f)).unwrap();
            }
            // A reader opened now still reads the condemned pack, but prefers the new one.
            let late = BlobStore::open(&r).unwrap();
            assert_ne!(late.location(&ids[1]).unwrap().pack, old.pack);
            assert_eq!(late.location(&ids[0]).unwrap().pack, old.pack);
            assert_eq!(
                &late.blob(&ids[0], BlobKind::Data).unwrap()[..],
                &b"dead".repeat(900)[..]
            );
            // A writer knowing the record does not see the condemned pack at all.
            let pending = writers::read_pending(&r).unwrap();
            assert_eq!(pending[0].id, record);
            let w = BlobStore::open_writer(&r, &pending).unwrap();
            assert!(!w.contains(&ids[0]) && w.contains(&ids[1]));
            // The pack is deleted: the early reader reloads the index and follows the blob.
            // (`late` holds the pack open: on Windows its name would stay, delete-pending and
            // unopenable, until that handle is closed.)
            drop(late);
            std::fs::remove_file(reader.pack_path(&old.pack)).unwrap();
            assert_eq!(
                &reader.blob(&ids[1], BlobKind::Data).unwrap()[..],
                &keep[..]
            );
            assert!(matches!(
                reader.blob(&ids[0], BlobKind::Data),
                Err(Error::MissingChunk { .. })
            ));
        }
    }

    /// Tree blobs go into packs of their own: a tree is read from packs that hold nothing
    /// else.
    #[test]
    fn tree_blobs_get_packs_of_their_own() {
        for (_d, r) in repos() {
            let store = BlobStore::open_writer(&r, &[]).unwrap();
            let p = Packer::new(&r, store.clone()).unwrap();
            let mut data = Vec::new();
            let mut trees = Vec::new();
            for i in 0..6u64 {
                data.extend(put_frame(&p, &[noise(i, 3000)]));
                trees.push(p.put_blob(BlobKind::Tree, &noise(100 + i, 500)).unwrap());
            }
            p.checkpoint().unwrap();
            let pack_of = |id: &ChunkId| store.location(id).unwrap().pack;
            let tree_pack = pack_of(&trees[0]);
            assert!(trees.iter().all(|t| pack_of(t) == tree_pack));
            assert!(data.iter().all(|d| pack_of(d) != tree_pack));
            let reader = BlobStore::open(&r).unwrap();
            for (i, t) in trees.iter().enumerate() {
                assert_eq!(
                    &reader.blob(t, BlobKind::Tree).unwrap()[..],
                    &noise(100 + i as u64, 500)[..]
                );
            }
        }
    }

    #[test]
    fn a_reload_keeps_packs_not_indexed_yet() {
        for (_d, r) in repos() {
            let store = BlobStore::open_writer(&r, &[]).unwrap();
            let p = Packer::new(&r, store.clone()).unwrap();
            let lost = put_frame(&p, &[noise(1, 5000)]);
            p.checkpoint().unwrap();
            // A pack finished but not yet in an index file (simulated), then a missing pack.
            let extra = put_frame(&p, &[noise(2, 5000)]);
            let open = p.state().open.take().unwrap();
            p.seal(&mut State::default(), open).unwrap();
            assert!(store.location(&extra[0]).is_some());
            let gone = store.location(&lost[0]).unwrap().pack;
            std::fs::remove_file(store.pack_path(&gone)).unwrap();
            assert!(matches!(
                store.blob(&lost[0], BlobKind::Data),
                Err(Error::MissingChunk { .. })
            ));
            assert!(store.location(&extra[0]).is_some());
            assert_eq!(
                &store.blob(&extra[0], BlobKind::Data).unwrap()[..],
                &noise(2, 5000)[..]
            );
        }
    }

    #[test]
    fn format_1_repositories_get_no_packer() {
        let dir = tempfile::tempdir().unwrap();
        let r = Repository::init(&dir.path().join("r"), &InitOptions::v1()).unwrap();
        assert_eq!(r.format_version(), 1);
        let store = BlobStore::open_writer(&r, &[]);
        if let Ok(store) = store {
            let e = Packer::new(&r, store).unwrap_err().to_string();
            assert!(e.contains("format 1 is read-only"), "{e}");
        }
    }
}
