//! Blobs: the unit of storage of a format-2 repository (docs/FORMAT.md, "Repository format 2").
//!
//! A blob is the content of one or more consecutive data blocks of a volume (a data blob), or
//! one node of a snapshot's block map (a tree blob). Blobs are named by the hash of their
//! uncompressed content and stored in frames inside pack files; the index says where. This
//! module holds the types every layer shares and the two traits that let the layers above
//! (trees, snapshots, backup, prune) work without knowing how blobs are stored.

use crate::error::Result;
use crate::hash::ChunkId;
use std::sync::Arc;

/// What a blob holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlobKind {
    /// Volume content: one or more consecutive blocks.
    Data,
    /// A node of a snapshot's block map (docs/FORMAT.md, "Tree nodes").
    Tree,
}

impl BlobKind {
    /// The byte stored in pack tables and index files.
    pub fn code(self) -> u8 {
        match self {
            BlobKind::Data => 0,
            BlobKind::Tree => 1,
        }
    }

    /// The kind stored as `code`, if it is one.
    pub fn from_code(code: u8) -> Option<BlobKind> {
        match code {
            0 => Some(BlobKind::Data),
            1 => Some(BlobKind::Tree),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BlobKind::Data => "data",
            BlobKind::Tree => "tree",
        }
    }
}

/// Where one blob lies inside a pack: one entry of a pack's blob table and of an index file
/// (52 bytes on disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobEntry {
    pub id: ChunkId,
    pub kind: BlobKind,
    /// Offset of the frame (its 16-byte chunk header) from the start of the pack file.
    pub frame_offset: u32,
    /// Length of the frame: 16 + stored length.
    pub frame_len: u32,
    /// Offset of the blob in the frame's decompressed content.
    pub raw_offset: u32,
    /// Length of the blob's uncompressed content.
    pub raw_len: u32,
}

/// A blob's location: its pack and its entry there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub pack: ChunkId,
    pub entry: BlobEntry,
}

/// Read access to blobs. Implemented by the repository's blob store; tests use an in-memory
/// map.
pub trait BlobSource: Send + Sync {
    /// The uncompressed content of blob `id`, checked against its id (hash). A blob the
    /// index does not know is an error naming it.
    fn blob(&self, id: &ChunkId, kind: BlobKind) -> Result<Arc<Vec<u8>>>;

    /// How many threads reading at once this source keeps busy (0: one per core). A source
    /// on object storage waits on the network, and more readers hide the round trips.
    fn readers(&self) -> usize {
        0
    }
}

/// Write access: stores a blob unless an identical one is already usable, and returns its id.
pub trait BlobSink: Send + Sync {
    fn put_blob(&self, kind: BlobKind, content: &[u8]) -> Result<ChunkId>;
}
