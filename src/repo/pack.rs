//! Pack files (docs/FORMAT.md, "Repository format 2", F2.2): frames of blobs followed by a
//! blob table and a trailer. Written once by a [`PackWriter`], named by the BLAKE3 of the
//! whole file, never modified.

pub use super::format::{
    BLOB_ENTRY_LEN, PACK_HEADER_LEN, PACK_MAGIC, PACK_TRAILER_LEN, PACK_VERSION,
};

use super::blob::{BlobEntry, BlobKind};
use crate::error::{Error, Result};
use crate::hash::ChunkId;
use std::fs::File;
use std::path::Path;

/// Appends the 52-byte table encoding of `e` to `out`.
pub fn encode_entry(e: &BlobEntry, out: &mut Vec<u8>) {
    out.extend_from_slice(&e.id.0);
    out.push(e.kind.code());
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&e.frame_offset.to_le_bytes());
    out.extend_from_slice(&e.frame_len.to_le_bytes());
    out.extend_from_slice(&e.raw_offset.to_le_bytes());
    out.extend_from_slice(&e.raw_len.to_le_bytes());
}

/// Decodes one 52-byte table entry; `None` for a short slice or an unknown kind.
pub fn decode_entry(b: &[u8]) -> Option<BlobEntry> {
    let _ = b;
    None
}

/// Reads and checks the blob table of pack `pack` at `path`.
pub fn read_pack_table(path: &Path, pack: &ChunkId) -> Result<Vec<BlobEntry>> {
    let _ = (path, pack);
    Err(Error::internal("pack", "not implemented yet"))
}

/// Reads the frame of `e` from `file` (the pack at `path`) and returns its checked,
/// decompressed content.
pub fn read_frame_raw(file: &File, path: &Path, e: &BlobEntry) -> Result<Vec<u8>> {
    let _ = (file, path, e);
    Err(Error::internal("pack", "not implemented yet"))
}

/// Writes one pack file.
#[derive(Debug)]
pub struct PackWriter {
    len: u64,
}

impl PackWriter {
    /// Starts a pack as a temporary file in `tmp_dir`.
    pub fn create(tmp_dir: &Path) -> Result<PackWriter> {
        let _ = tmp_dir;
        Err(Error::internal("pack", "not implemented yet"))
    }

    /// Appends one frame. `encoded`: a whole chunk encoding (16-byte VBCK header + payload,
    /// from `chunks::Encoder`); `blobs`: (id, kind, raw_offset, raw_len) of the blobs inside
    /// this frame's raw content.
    pub fn add_frame(
        &mut self,
        encoded: &[u8],
        blobs: &[(ChunkId, BlobKind, u32, u32)],
    ) -> Result<()> {
        let _ = (encoded, blobs);
        Err(Error::internal("pack", "not implemented yet"))
    }

    /// Bytes written so far (header and frames).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when no frame was added.
    pub fn is_empty(&self) -> bool {
        self.len <= PACK_HEADER_LEN as u64
    }

    /// Writes the table and trailer and renames the file to `packs_dir/XX/<id>`; not fsynced
    /// (the caller syncs the filesystem). Returns the pack id and its table.
    pub fn finish(self, packs_dir: &Path) -> Result<(ChunkId, Vec<BlobEntry>)> {
        let _ = packs_dir;
        Err(Error::internal("pack", "not implemented yet"))
    }
}
