//! The blob store: reads blobs through the index, with a small cache of decoded frames.

use super::Repository;
use super::blob::{BlobEntry, BlobKind, BlobSource, Location};
use super::index::Index;
use super::writers::PendingRecord;
use crate::error::{Error, Result};
use crate::hash::ChunkId;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

/// Blob access of one repository (thread-safe).
pub struct BlobStore {
    packs_dir: PathBuf,
    index: RwLock<Index>,
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStore")
            .field("packs_dir", &self.packs_dir)
            .finish_non_exhaustive()
    }
}

impl BlobStore {
    /// A reader's store: every index file, plus the tables of packs of pending records.
    pub fn open(repo: &Repository) -> Result<Arc<BlobStore>> {
        let _ = repo;
        Err(Error::internal("blob store", "not implemented yet"))
    }

    /// A writer's store: every index file, without the packs of `known_pending`.
    pub fn open_writer(
        repo: &Repository,
        known_pending: &[PendingRecord],
    ) -> Result<Arc<BlobStore>> {
        let _ = (repo, known_pending);
        Err(Error::internal("blob store", "not implemented yet"))
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.with_index(|i| i.contains(id))
    }

    pub fn location(&self, id: &ChunkId) -> Option<Location> {
        self.with_index(|i| i.get(id))
    }

    /// Adds the table of a finished pack.
    pub fn insert(&self, pack: ChunkId, entries: &[BlobEntry]) {
        if let Ok(mut i) = self.index.write() {
            i.insert(pack, entries);
        }
    }

    /// Loads index files written since the store was opened.
    pub fn refresh(&self) -> Result<()> {
        Err(Error::internal("blob store", "not implemented yet"))
    }

    /// The decoded frame at `loc`.
    pub fn frame(&self, loc: &Location) -> Result<Arc<Vec<u8>>> {
        let _ = loc;
        Err(Error::internal("blob store", "not implemented yet"))
    }

    /// Where pack `pack` lives.
    pub fn pack_path(&self, pack: &ChunkId) -> PathBuf {
        let hex = pack.to_hex();
        self.packs_dir.join(&hex[..2]).join(hex)
    }

    /// Runs `f` on the in-memory index.
    pub fn with_index<R>(&self, f: impl FnOnce(&Index) -> R) -> R {
        match self.index.read() {
            Ok(i) => f(&i),
            Err(poisoned) => f(&poisoned.into_inner()),
        }
    }
}

impl BlobSource for BlobStore {
    fn blob(&self, id: &ChunkId, kind: BlobKind) -> Result<Arc<Vec<u8>>> {
        let _ = (id, kind);
        Err(Error::internal("blob store", "not implemented yet"))
    }
}
