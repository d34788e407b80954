//! Which files make up a copy: its metadata, its data files (or slices, or the BIN directory)
//! and its hash list. `restore` protects them all from being written over; `copy --update`
//! reads the existing copy's format from them.

use super::{CopyFormat, CopyMeta, CopyPaths, CopyVolume, OpenedCopy};
use std::path::{Path, PathBuf};

impl CopyPaths {
    /// Every path that makes up the copy `meta` describes: the metadata file, the BIN
    /// directory (for a BIN copy), each data file in volume order, then the hash list.
    pub fn members(&self, meta: &CopyMeta) -> Vec<PathBuf> {
        let mut paths = vec![self.meta()];
        if meta.container == CopyFormat::Bin {
            paths.push(self.dir.clone());
        }
        paths.extend(meta.files.iter().map(|f| self.file(&f.name)));
        if let Some(h) = &meta.hashes {
            paths.push(self.file(&h.name));
        }
        paths
    }
}

/// Where a copy is and what its metadata says, apart from its volume.
#[derive(Debug, Clone)]
pub struct CopyInfo {
    pub paths: CopyPaths,
    pub meta: CopyMeta,
}

impl OpenedCopy {
    /// Every path that makes up this copy (see [`CopyPaths::members`]).
    pub fn members(&self) -> Vec<PathBuf> {
        self.paths.members(&self.meta)
    }

    /// The volume, and where the copy is with its metadata.
    pub fn split(self) -> (CopyVolume, CopyInfo) {
        let info = CopyInfo {
            paths: self.paths,
            meta: self.meta,
        };
        (self.volume, info)
    }
}

/// The format of the copy that `path` names, when there is one whose metadata can be read;
/// `None` otherwise (no copy there yet, or metadata the run itself will report on).
pub fn existing_format(path: &Path) -> Option<CopyFormat> {
    let paths = CopyPaths::locate(path)?;
    CopyMeta::load(&paths).ok().map(|m| m.container)
}
