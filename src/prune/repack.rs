//! Repack: copies the live frames of partly dead packs into new packs, so that the old packs
//! can be deleted.
//!
//! Liveness is decided per frame, so a live frame is copied whole and verbatim (its encoded
//! bytes, not recompressed): every blob keeps its offset in the frame's content. That is
//! what lets a reader that loaded the index before the prune, finding an old pack gone,
//! reload the index and read the same bytes at the blob's new location (the blob store's
//! retry requires the same offset in the frame). Each frame is decoded and the blobs it keeps
//! are checked against their ids first; a blob that does not match is left out of the new
//! pack's table (a live one makes the whole pack stay as it is). A frame none of whose live
//! blobs is wanted (all are kept in packs that stay) is not copied.
//!
//! The new packs go through a [`Packer`], whose checkpoint makes them durable and indexed
//! before anything names the old packs as condemned. A pack that cannot be read is left
//! alone (not repacked, not deleted) with a warning: frames copied from it before the
//! problem was met then exist twice, which is harmless.

use super::AbortPoint;
use crate::error::{Error, Result, chain};
use crate::hash::ChunkId;
use crate::platform;
use crate::progress::Progress;
use crate::repo::Repository;
use crate::repo::blob::{BlobEntry, BlobKind};
use crate::repo::blobs::BlobStore;
use crate::repo::chunks::decode_encoded;
use crate::repo::fsio;
use crate::repo::pack::MAX_FRAME_LEN;
use crate::repo::packer::Packer;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// What a repack did.
#[derive(Debug, Default)]
pub struct RepackOutcome {
    /// Packs whose live blobs were all copied (they can be condemned).
    pub done: Vec<ChunkId>,
    /// Packs left alone because they could not be read.
    pub skipped: Vec<ChunkId>,
    /// Blobs copied (those of the copied frames that match their ids), and the bytes of the
    /// frames written.
    pub blobs_copied: u64,
    pub bytes_written: u64,
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
    let hash = repo.config().chunk_hash;
    let total: u64 = to_repack
        .iter()
        .filter_map(|p| tables.get(p))
        .map(|t| super::plan::pack_file_len(t))
        .sum();
    progress.start("repack", total);
    let mut raw = Vec::new();
    for pack in to_repack {
        let Some(entries) = tables.get(pack) else {
            continue;
        };
        let path = store.pack_path(pack);
        let copied = (|| -> Result<(u64, u64)> {
            let file = fsio::open_regular(&path, false, "open")?;
            let (mut blobs_n, mut bytes) = (0u64, 0u64);
            for (offset, (len, idx)) in super::plan::frames(entries) {
                if !idx.iter().any(|&i| wanted.contains(&entries[i].id)) {
                    continue;
                }
                let what = format!("frame at offset {offset}");
                if len > MAX_FRAME_LEN {
                    return Err(Error::corrupt(what, &path, "frame length is impossible"));
                }
                let mut frame = vec![0u8; len as usize];
                platform::read_exact_at(&file, &mut frame, u64::from(offset)).map_err(
                    |source| Error::IoAt {
                        op: "read",
                        path: path.clone(),
                        offset: u64::from(offset),
                        source,
                    },
                )?;
                decode_encoded(&frame, &what, &path, &mut raw)?;
                let mut keep: Vec<(ChunkId, BlobKind, u32, u32)> = Vec::new();
                for &i in &idx {
                    let e: &BlobEntry = &entries[i];
                    let start = e.raw_offset as usize;
                    let good = raw
                        .get(start..start + e.raw_len as usize)
                        .is_some_and(|c| hash.hash(c) == e.id);
                    if good {
                        keep.push((e.id, e.kind, e.raw_offset, e.raw_len));
                    } else if wanted.contains(&e.id) {
                        return Err(Error::corrupt(
                            format!("blob {} ({what})", e.id),
                            &path,
                            "content does not match its id",
                        ));
                    }
                }
                bytes += packer.add_frame(&frame, &keep)?;
                for k in &keep {
                    wanted.remove(&k.0);
                }
                blobs_n += keep.len() as u64;
            }
            Ok((blobs_n, bytes))
        })();
        match copied {
            Ok((n, bytes)) => {
                out.blobs_copied += n;
                out.bytes_written += bytes;
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
        progress.advance(super::plan::pack_file_len(entries));
        abort.at("repack-pack");
    }
    // New packs durable (filesystem synced) and indexed before any record condemns the old.
    packer.checkpoint()?;
    progress.finish();
    abort.at("repack-index");
    Ok(out)
}
