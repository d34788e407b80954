//! The packer: appends frames to pack files during a backup or a repack, and makes them
//! durable and indexed at checkpoints.

use super::Repository;
use super::blob::{BlobKind, BlobSink};
use super::blobs::BlobStore;
use crate::error::{Error, Result};
use crate::hash::ChunkId;
use std::sync::Arc;

/// Writes packs of one writer (thread-safe).
#[derive(Debug)]
pub struct Packer {
    store: Arc<BlobStore>,
}

impl Packer {
    pub fn new(repo: &Repository, store: Arc<BlobStore>) -> Result<Packer> {
        let _ = repo;
        Ok(Packer { store })
    }

    /// Appends one encoded frame (thread-safe); the blobs become visible to
    /// `store.contains` at once. Returns the bytes written (frame length).
    pub fn add_frame(
        &self,
        encoded: &[u8],
        blobs: &[(ChunkId, BlobKind, u32, u32)],
    ) -> Result<u64> {
        let _ = (encoded, blobs, &self.store);
        Err(Error::internal("packer", "not implemented yet"))
    }

    /// Finishes the open pack, syncs the filesystem, writes one index file for every pack
    /// finished since the last checkpoint. After it returns, every blob added before is
    /// durable and indexed.
    pub fn checkpoint(&self) -> Result<()> {
        Err(Error::internal("packer", "not implemented yet"))
    }

    /// Packs finished so far.
    pub fn packs_written(&self) -> u64 {
        0
    }
}

impl BlobSink for Packer {
    fn put_blob(&self, kind: BlobKind, content: &[u8]) -> Result<ChunkId> {
        let _ = (kind, content);
        Err(Error::internal("packer", "not implemented yet"))
    }
}
