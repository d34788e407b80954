//! Index files (docs/FORMAT.md, F2.3) and the in-memory index: where each blob is.

use super::Repository;
use super::blob::{BlobEntry, Location};
use crate::error::{Error, Result};
use crate::hash::ChunkId;
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// The content of one index file: packs and their blob tables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexFile {
    pub packs: Vec<(ChunkId, Vec<BlobEntry>)>,
}

impl IndexFile {
    /// The file's bytes, trailing BLAKE3 included.
    pub fn encode(&self) -> Vec<u8> {
        Vec::new()
    }

    /// Parses and checks an index file read from `path`.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<IndexFile> {
        let _ = (bytes, path);
        Err(Error::internal("index", "not implemented yet"))
    }

    /// Writes the file durably into the repository's index directory; returns its id.
    pub fn write(&self, repo: &Repository) -> Result<String> {
        let _ = repo;
        Err(Error::internal("index", "not implemented yet"))
    }

    /// Reads and checks index file `path` (its name must be its checksum).
    pub fn read(path: &Path) -> Result<IndexFile> {
        let _ = path;
        Err(Error::internal("index", "not implemented yet"))
    }
}

/// Ids of the index files of `repo` (temporary files skipped).
pub fn list_index_files(repo: &Repository) -> Result<Vec<String>> {
    let _ = repo;
    Err(Error::internal("index", "not implemented yet"))
}

/// The in-memory union of index files: blob id -> location.
#[derive(Debug, Default)]
pub struct Index {
    packs: Vec<ChunkId>,
    entries: Vec<Vec<BlobEntry>>,
    by_pack: HashMap<ChunkId, u32>,
    blobs: HashMap<ChunkId, (u32, u32)>,
    files: HashSet<String>,
    #[allow(dead_code)]
    exclude: HashSet<ChunkId>,
}

impl Index {
    /// Loads every index file of `repo`, leaving out the packs in `exclude_packs`.
    pub fn load(repo: &Repository, exclude_packs: &HashSet<ChunkId>) -> Result<Index> {
        let _ = (repo, exclude_packs);
        Err(Error::internal("index", "not implemented yet"))
    }

    /// Loads the index files not loaded yet; returns how many.
    pub fn refresh(&mut self, repo: &Repository) -> Result<usize> {
        let _ = repo;
        Err(Error::internal("index", "not implemented yet"))
    }

    /// Where blob `id` is.
    pub fn get(&self, id: &ChunkId) -> Option<Location> {
        let &(p, i) = self.blobs.get(id)?;
        Some(Location {
            pack: *self.packs.get(p as usize)?,
            entry: *self.entries.get(p as usize)?.get(i as usize)?,
        })
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.blobs.contains_key(id)
    }

    /// Adds the table of `pack`.
    pub fn insert(&mut self, pack: ChunkId, entries: &[BlobEntry]) {
        let _ = (pack, entries);
    }

    /// Number of blobs.
    pub fn len(&self) -> usize {
        self.blobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }

    /// Every indexed pack.
    pub fn packs(&self) -> Vec<ChunkId> {
        self.packs.clone()
    }

    /// Every entry of `pack` as indexed.
    pub fn pack_entries(&self, pack: &ChunkId) -> Option<&[BlobEntry]> {
        let &p = self.by_pack.get(pack)?;
        self.entries.get(p as usize).map(|v| &v[..])
    }

    /// Ids of the index files loaded.
    pub fn files(&self) -> Vec<String> {
        self.files.iter().cloned().collect()
    }
}
