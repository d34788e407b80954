//! Backup sources: a block device or a regular file, always opened read-only.

use crate::error::{Error, IoContext, Result};
use crate::platform::{self, Geometry, ObjectKind};
use crate::volume::Volume;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// An opened source volume.
#[derive(Debug)]
pub struct Source {
    path: PathBuf,
    file: File,
    geometry: Geometry,
}

/// What a snapshot records about the volume it was taken from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// The path given by the user, made absolute.
    pub path: String,
    /// "block-device" or "file".
    pub kind: String,
    /// Size in bytes.
    pub size: u64,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
}

impl Source {
    /// Opens `path` read-only and reads its geometry.
    pub fn open(path: &Path) -> Result<Source> {
        let file = platform::open_read_only(path).ctx("open source", path)?;
        let geometry = platform::geometry(&file).ctx("read the geometry of", path)?;
        if geometry.kind == ObjectKind::Other {
            return Err(Error::BadSource {
                path: path.to_path_buf(),
                detail: "not a block device or a regular file".into(),
            });
        }
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        Ok(Source {
            path,
            file,
            geometry,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The description a snapshot stores.
    pub fn info(&self) -> SourceInfo {
        SourceInfo {
            path: self.path.to_string_lossy().into_owned(),
            kind: match self.geometry.kind {
                ObjectKind::BlockDevice => "block-device".into(),
                _ => "file".into(),
            },
            size: self.geometry.size,
            logical_sector_size: self.geometry.logical_sector_size,
            physical_sector_size: self.geometry.physical_sector_size,
        }
    }

    /// The underlying open file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Volume for Source {
    fn size(&self) -> u64 {
        self.geometry.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.geometry.size);
        if end.is_none() {
            return Err(Error::InvalidArgument(format!(
                "read of {} bytes at offset {offset} is past the end of {} ({} bytes)",
                buf.len(),
                self.path.display(),
                self.geometry.size
            )));
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            match platform::read_at(&self.file, &mut buf[done..], pos) {
                Ok(0) => {
                    return Err(Error::IoAt {
                        op: "read",
                        path: self.path.clone(),
                        offset: pos,
                        source: std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "the source ended early (did it shrink?)",
                        ),
                    });
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::IoAt {
                        op: "read",
                        path: self.path.clone(),
                        offset: pos,
                        source: e,
                    });
                }
            }
        }
        Ok(())
    }

    fn next_data(&self, offset: u64, end: u64) -> Result<Option<Range<u64>>> {
        let end = end.min(self.geometry.size);
        let r = platform::next_data(&self.file, offset, end).map_err(|e| Error::IoAt {
            op: "find data in",
            path: self.path.clone(),
            offset,
            source: e,
        })?;
        Ok(r.map(|(s, e)| s..e))
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}
