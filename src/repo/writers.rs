//! Writer markers and pending records (docs/FORMAT.md, F2.8).

use super::Repository;
use crate::error::{Error, Result};
use crate::hash::ChunkId;

/// A prune's condemnation record, `pending/<id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRecord {
    pub id: String,
    pub created: String,
    pub packs: Vec<ChunkId>,
    pub index: Vec<String>,
}

/// Every pending record of `repo`.
pub fn read_pending(repo: &Repository) -> Result<Vec<PendingRecord>> {
    let _ = repo;
    Err(Error::internal("writers", "not implemented yet"))
}

/// Writes a pending record durably; returns its id.
pub fn write_pending(repo: &Repository, packs: &[ChunkId], index: &[String]) -> Result<String> {
    let _ = (repo, packs, index);
    Err(Error::internal("writers", "not implemented yet"))
}

/// Removes pending record `id` (durably; a missing one is fine).
pub fn remove_pending(repo: &Repository, id: &str) -> Result<()> {
    let _ = (repo, id);
    Err(Error::internal("writers", "not implemented yet"))
}

/// A running writer's marker `writers/<id>`: holds its exclusive lock; dropping releases and
/// removes it.
#[derive(Debug)]
pub struct WriterMarker {
    id: String,
}

impl WriterMarker {
    /// The marker's id (its file name).
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// Creates this process's writer marker, reads the pending records, and records in the
/// marker that it knows them.
pub fn register_writer(repo: &Repository) -> Result<(WriterMarker, Vec<PendingRecord>)> {
    let _ = repo;
    Err(Error::internal("writers", "not implemented yet"))
}

/// What a live writer's marker says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterInfo {
    pub id: String,
    pub pid: u32,
    pub host: String,
    pub started: String,
    pub knows: Vec<String>,
}

/// The live writers of `repo`; markers of dead writers (lockable) are removed.
pub fn live_writers(repo: &Repository) -> Result<Vec<WriterInfo>> {
    let _ = repo;
    Err(Error::internal("writers", "not implemented yet"))
}
