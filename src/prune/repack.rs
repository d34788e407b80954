//! Repack: copies the live blobs of partly dead packs into new packs, so that the old packs
//! can be deleted.
//!
//! A frame is read, opened (authenticated, in an encrypted repository) and decompressed whole
//! ([`read_frame_raw`]); each of its blobs that is
//! live and has no copy in a pack that stays is checked against its id and appended to a new
//! frame; dead blobs of live frames are dropped. New frames hold up to [`FRAME_RAW_TARGET`]
//! bytes of data blobs; a tree blob is alone in its frame (as a backup writes them). Blobs
//! change offsets: readers find them again by id ([`crate::repo::blob::BlobSource::blob`]
//! reloads the index when a pack is gone). The new packs go through a [`Packer`], whose
//! checkpoint makes them durable and indexed before anything names the old packs as
//! condemned. A pack that cannot be read is left alone (not repacked, not deleted) with a
//! warning: its blobs copied before the problem was met then exist twice, which is harmless.

use super::AbortPoint;
use crate::error::{Error, Result, chain};
use crate::hash::ChunkId;
use crate::progress::Progress;
use crate::repo::Repository;
use crate::repo::blob::{BlobEntry, BlobKind};
use crate::repo::blobs::BlobStore;
use crate::repo::pack::{FrameEncoder, read_frame_raw};
use crate::repo::packer::Packer;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Largest raw content of a new frame of data blobs (a larger blob gets a frame of its own).
pub const FRAME_RAW_TARGET: usize = 1 << 20;

/// What a repack did.
#[derive(Debug, Default)]
pub struct RepackOutcome {
    /// Packs whose live blobs were all copied (they can be condemned).
    pub done: Vec<ChunkId>,
    /// Packs left alone because they could not be read.
    pub skipped: Vec<ChunkId>,
    /// Blobs copied, and the bytes of new frames written.
    pub blobs_copied: u64,
    pub bytes_written: u64,
}

/// Blobs collected for the next frame.
struct FrameBuf {
    raw: Vec<u8>,
    blobs: Vec<(ChunkId, BlobKind, u32, u32)>,
    encoder: FrameEncoder,
    written: u64,
}

impl FrameBuf {
    fn flush(&mut self, packer: &Packer) -> Result<()> {
        if self.blobs.is_empty() {
            return Ok(());
        }
        let stored = self.encoder.encode(&self.raw)?;
        self.written += packer.add_frame(stored, self.raw.len() as u32, &self.blobs)?;
        self.raw.clear();
        self.blobs.clear();
        Ok(())
    }

    fn add(&mut self, packer: &Packer, id: ChunkId, kind: BlobKind, content: &[u8]) -> Result<()> {
        let alone = kind == BlobKind::Tree;
        if alone || self.raw.len() + content.len() > FRAME_RAW_TARGET {
            self.flush(packer)?;
        }
        self.blobs
            .push((id, kind, self.raw.len() as u32, content.len() as u32));
        self.raw.extend_from_slice(content);
        if alone {
            self.flush(packer)?;
        }
        Ok(())
    }
}

/// Copies into new packs the blobs of `wanted` found in the packs `to_repack` (tables in
/// `tables`), each once. `wanted` should hold the live blobs of those packs that no pack
/// staying in the repository holds; it is emptied as blobs are copied.
pub fn repack(
    repo: &Repository,
    tables: &HashMap<ChunkId, Vec<BlobEntry>>,
    to_repack: &[ChunkId],
    wanted: &mut HashSet<ChunkId>,
    progress: &dyn Progress,
    abort: &AbortPoint,
) -> Result<RepackOutcome> {
    let mut out = RepackOutcome::default();
    if to_repack.is_empty() {
        return Ok(out);
    }
    // A writer's store that knows nothing of pending packs is not needed: the packer only
    // appends, and its index files name only its own packs.
    let store: Arc<BlobStore> = BlobStore::open_writer(repo, &[])?;
    let packer = Packer::new(repo, store.clone())?;
    let sealer = repo.sealer();
    let mut buf = FrameBuf {
        raw: Vec::new(),
        blobs: Vec::new(),
        encoder: FrameEncoder::new(repo.config().zstd_level, sealer)?,
        written: 0,
    };
    let total: u64 = to_repack
        .iter()
        .filter_map(|p| tables.get(p))
        .flat_map(|t| t.iter().map(|e| u64::from(e.raw_len)))
        .sum();
    progress.start("repack", total);
    for pack in to_repack {
        let Some(entries) = tables.get(pack) else {
            continue;
        };
        let path = store.pack_path(pack);
        // Errors reading the old pack skip it; an error writing the new packs ends the
        // repack (frames of packs already counted as done may be lost with it).
        let mut write_error: Option<Error> = None;
        let copied = (|| -> Result<u64> {
            let b = repo.backend().as_ref();
            let mut n = 0u64;
            for (_, (_, idx)) in super::plan::frames(entries) {
                if !idx.iter().any(|&i| wanted.contains(&entries[i].id)) {
                    continue;
                }
                let raw = read_frame_raw(b, pack, &entries[idx[0]], sealer)?;
                for &i in &idx {
                    let e = &entries[i];
                    if !wanted.contains(&e.id) {
                        continue;
                    }
                    let start = e.raw_offset as usize;
                    let content = raw.get(start..start + e.raw_len as usize).ok_or_else(|| {
                        Error::corrupt(
                            format!("blob {}", e.id),
                            &path,
                            "lies beyond its frame's content",
                        )
                    })?;
                    if sealer.blob_id(content) != e.id {
                        return Err(Error::corrupt(
                            format!("blob {}", e.id),
                            &path,
                            "content does not match its id",
                        ));
                    }
                    if let Err(err) = buf.add(&packer, e.id, e.kind, content) {
                        write_error = Some(err);
                        return Ok(n);
                    }
                    wanted.remove(&e.id);
                    n += 1;
                }
            }
            Ok(n)
        })();
        if let Some(e) = write_error {
            return Err(e);
        }
        match copied {
            Ok(n) => {
                out.blobs_copied += n;
                out.done.push(*pack);
            }
            Err(e) => {
                progress.warn(&format!(
                    "pack {pack} is not repacked (kept as it is): {}",
                    chain(&e)
                ));
                out.skipped.push(*pack);
            }
        }
        progress.advance(entries.iter().map(|e| u64::from(e.raw_len)).sum());
        abort.at("repack-pack");
    }
    buf.flush(&packer)?;
    // New packs durable (filesystem synced) and indexed before any record condemns the old.
    packer.checkpoint()?;
    progress.finish();
    out.bytes_written = buf.written;
    abort.at("repack-index");
    Ok(out)
}
