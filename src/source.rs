//! Backup sources: a block device or a regular file, always opened read-only.

use crate::buffer::{ALIGN, AlignedBuf};
use crate::error::{Error, IoContext, Result};
use crate::platform::{self, Geometry, ObjectKind};
use crate::volume::Volume;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// An opened source volume.
#[derive(Debug)]
pub struct Source {
    path: PathBuf,
    file: File,
    /// A second descriptor opened with `O_DIRECT` for bulk reads, while it works.
    direct: Option<File>,
    direct_ok: AtomicBool,
    geometry: Geometry,
}

/// What a snapshot records about the volume it was taken from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// The path given by the user, made canonical: absolute, with `.`, `..` and symbolic
    /// links resolved (`/dev/disk/by-id/…` becomes `/dev/sdX`), so that one volume is
    /// known by one path whichever way it is named. Snapshots made before volback
    /// canonicalised paths hold the path as given, made absolute.
    pub path: String,
    /// "block-device" or "file".
    pub kind: String,
    /// Size in bytes.
    pub size: u64,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
}

/// `path` made canonical ([`SourceInfo::path`]); absolute only where it cannot be resolved,
/// and on Windows (where canonical paths take the `\\?\` form that other tools do not
/// show).
pub fn canonical(path: &Path) -> PathBuf {
    if !cfg!(windows)
        && let Ok(c) = std::fs::canonicalize(path)
    {
        return c;
    }
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
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
        let direct = platform::open_direct(path);
        let path = canonical(path);
        Ok(Source {
            path,
            direct_ok: AtomicBool::new(direct.is_some()),
            direct,
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

    /// True while bulk reads bypass the page cache.
    pub fn uses_direct_io(&self) -> bool {
        self.direct.is_some() && self.direct_ok.load(Ordering::Relaxed)
    }

    /// Reads `len` bytes at `offset` into `buf` for a bulk sequential pass: with `O_DIRECT`
    /// (no page-cache copy) when `offset` is aligned and the filesystem allows it, through the
    /// page cache otherwise. `buf` must hold `len` rounded up to [`ALIGN`].
    pub fn read_bulk(&self, offset: u64, buf: &mut AlignedBuf, len: usize) -> Result<()> {
        // Large runs are read as two concurrent halves: two requests in flight get more out of
        // the device than one.
        const SPLIT_ABOVE: usize = 1 << 20;
        if len > SPLIT_ABOVE && self.uses_direct_io() {
            let half = (len / 2).div_ceil(ALIGN) * ALIGN;
            let (a, b) = buf.split_at_mut(half);
            let (ra, rb) = std::thread::scope(|s| {
                let t = s.spawn(|| self.read_bulk_slice(offset + half as u64, b, len - half));
                let ra = self.read_bulk_slice(offset, a, half);
                let rb = t
                    .join()
                    .unwrap_or_else(|_| Err(Error::internal("source", "a read thread panicked")));
                (ra, rb)
            });
            return ra.and(rb);
        }
        self.read_bulk_slice(offset, buf, len)
    }

    /// [`Source::read_bulk`] into a slice that starts on an [`ALIGN`] boundary.
    fn read_bulk_slice(&self, offset: u64, buf: &mut [u8], len: usize) -> Result<()> {
        if let Some(direct) = &self.direct {
            let aligned_len = len.div_ceil(ALIGN) * ALIGN;
            if self.direct_ok.load(Ordering::Relaxed)
                && offset.is_multiple_of(ALIGN as u64)
                && (buf.as_ptr() as usize).is_multiple_of(ALIGN)
                && aligned_len <= buf.len()
            {
                match read_direct(direct, &mut buf[..aligned_len], offset, len) {
                    Ok(()) => return Ok(()),
                    // A bad sector: the caller rescues the run sector by sector; direct
                    // reads stay on for the rest of the volume.
                    Err(e) if platform::is_media_error(&e) => {
                        return Err(Error::IoAt {
                            op: "read",
                            path: self.path.clone(),
                            offset,
                            source: e,
                        });
                    }
                    // Not supported here (EINVAL) or anything odd: fall back for good; a
                    // real I/O error shows up again on the buffered read below.
                    Err(_) => self.direct_ok.store(false, Ordering::Relaxed),
                }
            }
        }
        self.read_at(offset, &mut buf[..len])
    }
}

/// Fills `buf` (aligned, a multiple of [`ALIGN`]) from `offset`; at least `need` bytes must
/// arrive (the rest may be past the end of the file).
fn read_direct(file: &File, buf: &mut [u8], offset: u64, need: usize) -> std::io::Result<()> {
    let mut done = 0usize;
    while done < need {
        match platform::read_at(file, &mut buf[done..], offset + done as u64) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "short direct read",
                ));
            }
            // A short read that is not sector-aligned cannot be continued with O_DIRECT.
            Ok(n) if (done + n) < need && !(done + n).is_multiple_of(ALIGN) => {
                return Err(std::io::Error::other("unaligned short direct read"));
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
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
            return Err(Error::read_out_of_range(
                self.path.display().to_string(),
                offset,
                buf.len() as u64,
                self.geometry.size,
            ));
        }
        platform::read_exact_at(&self.file, buf, offset).map_err(|e| Error::IoAt {
            op: "read",
            path: self.path.clone(),
            offset,
            source: if e.kind() == std::io::ErrorKind::UnexpectedEof {
                std::io::Error::new(e.kind(), format!("{e} (did the source shrink?)"))
            } else {
                e
            },
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Bulk (O_DIRECT where possible) and plain reads return the same bytes, including the
    /// short last block of a file whose size is not a multiple of the sector size, on the test
    /// directory's filesystem and on tmpfs (where O_DIRECT is refused and reads fall back).
    #[test]
    fn bulk_reads_match_plain_reads() {
        let mut dirs = vec![tempfile::tempdir().unwrap()];
        if Path::new("/dev/shm").is_dir() {
            dirs.push(tempfile::tempdir_in("/dev/shm").unwrap());
        }
        for dir in &dirs {
            let path = dir.path().join("src.img");
            let data: Vec<u8> = (0..(3 << 20) + 777u32)
                .map(|i| (i * 31 % 251) as u8)
                .collect();
            std::fs::write(&path, &data).unwrap();
            let src = Source::open(&path).unwrap();
            let mut buf = AlignedBuf::new(4 << 20);
            // The last case is above the split size: two concurrent halves, short tail.
            for (off, len) in [
                (0u64, 1 << 20),
                (1 << 20, 4096),
                (3 << 20, 777),
                (0, (3 << 20) + 777),
            ] {
                src.read_bulk(off, &mut buf, len).unwrap();
                assert_eq!(&buf[..len], &data[off as usize..off as usize + len]);
            }
        }
    }
}
