//! A complete copy as a [`Volume`], every block checked against its SHA-256 as it is read.

use super::engine::ZeroHashes;
use super::format::*;
use super::hashes::{HashList, sha256};
use super::meta::{CopyMeta, CopyPaths, bad_copy};
use crate::error::{Error, Result};
use crate::volume::Volume;
use std::collections::VecDeque;
use std::fs::File;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Verified blocks kept for reads that come back to them (at most this many bytes).
const CACHE_BYTES: u64 = 32 << 20;

/// Read access to a complete copy.
pub struct CopyVolume {
    inner: Box<dyn Volume>,
    hashes: HashList,
    block_size: u64,
    size: u64,
    zeros: ZeroHashes,
    cache: Mutex<VecDeque<(u64, Arc<Vec<u8>>)>>,
    cache_blocks: usize,
    dest: PathBuf,
    /// A shared lock on the copy: no update runs while it is read.
    _lock: File,
}

impl CopyVolume {
    pub(crate) fn new(
        paths: &CopyPaths,
        meta: &CopyMeta,
        inner: Box<dyn Volume>,
        hashes: HashList,
        lock: File,
    ) -> CopyVolume {
        let bs = meta.block_size as u64;
        CopyVolume {
            inner,
            hashes,
            block_size: bs,
            size: meta.size,
            zeros: ZeroHashes::new(meta.size, bs),
            cache: Mutex::new(VecDeque::new()),
            cache_blocks: (CACHE_BYTES / bs).clamp(1, 16) as usize,
            dest: paths.dest(),
            _lock: lock,
        }
    }

    /// Block `index`, read whole and checked against the hash list.
    fn block(&self, index: u64) -> Result<Arc<Vec<u8>>> {
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, b)) = cache.iter().find(|(i, _)| *i == index) {
                return Ok(b.clone());
            }
        }
        let start = index * self.block_size;
        let len = (self.size - start).min(self.block_size) as usize;
        let mut data = vec![0u8; len];
        self.inner.read_at(start, &mut data)?;
        if sha256(&data) != self.hashes.get(index)? {
            return Err(Error::corrupt(
                format!("block {index} (bytes {start}..{})", start + len as u64),
                &self.dest,
                "its content does not match its SHA-256 in the hash list",
            ));
        }
        let data = Arc::new(data);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= self.cache_blocks {
            cache.pop_front();
        }
        cache.push_back((index, data.clone()));
        Ok(data)
    }
}

impl Volume for CopyVolume {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        crate::volume::check_read(self.size, offset, buf.len(), || {
            format!("copy {}", self.dest.display())
        })?;
        let bs = self.block_size;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let index = pos / bs;
            let within = (pos % bs) as usize;
            let block = self.block(index)?;
            let n = (block.len() - within).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&block[within..within + n]);
            done += n;
        }
        Ok(())
    }

    /// Every block's SHA-256 is in the hash list.
    fn known_hash(&self, offset: u64) -> Result<Option<crate::volume::KnownHash>> {
        if offset >= self.size {
            return Ok(None);
        }
        let index = offset / self.block_size;
        let start = index * self.block_size;
        Ok(Some(crate::volume::KnownHash {
            start,
            len: (self.size - start).min(self.block_size),
            algorithm: crate::hash::HashAlgorithm::Sha256,
            hash: crate::hash::ChunkId(self.hashes.get(index)?),
        }))
    }

    /// The data files' data ranges; a block inside a hole whose recorded hash is not that of
    /// zeros is reported as data, so that reading it fails its check instead of silently
    /// reading zeros.
    fn next_data(&self, offset: u64, end: u64) -> Result<Option<Range<u64>>> {
        let end = end.min(self.size);
        if offset >= end {
            return Ok(None);
        }
        let (ds, de) = match self.inner.next_data(offset, end)? {
            Some(r) => (r.start.max(offset), r.end.min(end)),
            None => (end, end),
        };
        let bs = self.block_size;
        // Blocks entirely inside the hole [offset, ds).
        let first = offset.div_ceil(bs);
        let last = ds / bs;
        let mut buf =
            vec![0u8; (4096 * HASH_LEN).min(((last.saturating_sub(first)) as usize) * HASH_LEN)];
        let mut b = first;
        while b < last {
            let n = (last - b).min(4096);
            let chunk = &mut buf[..n as usize * HASH_LEN];
            self.hashes.read(b, chunk)?;
            for (k, h) in chunk.chunks_exact(HASH_LEN).enumerate() {
                let block = b + k as u64;
                if h != self.zeros.of(block) {
                    let s = (block * bs).max(offset);
                    return Ok(Some(s..((block + 1) * bs).min(end)));
                }
            }
            b += n;
        }
        Ok((ds < de).then_some(ds..de))
    }

    fn describe(&self) -> String {
        format!("copy {}", self.dest.display())
    }
}

/// The image file of a copy in an image format; an error when it is missing.
pub(super) fn image_path(paths: &CopyPaths, meta: &CopyMeta) -> Result<PathBuf> {
    let path = paths.file(&meta.files[0].name);
    if !path.is_file() {
        return Err(bad_copy(
            &paths.meta(),
            format!("image file {} is missing", path.display()),
        ));
    }
    Ok(path)
}

/// Opens the data files of a copy (without hash checks) as a volume.
pub(crate) fn open_data(paths: &CopyPaths, meta: &CopyMeta) -> Result<Box<dyn Volume>> {
    match meta.container.image() {
        None => Ok(Box::new(super::files::FileSet::open(
            paths,
            &meta.files,
            false,
        )?)),
        Some(format) => {
            let path = image_path(paths, meta)?;
            let v = crate::image::open(format, &path)?;
            // Images count whole 512-byte sectors: the volume may end inside the last one.
            if v.size() != format.virtual_size(meta.size) {
                return Err(bad_copy(
                    &paths.meta(),
                    format!(
                        "image {} holds {} bytes, the metadata says {}",
                        path.display(),
                        v.size(),
                        meta.size
                    ),
                ));
            }
            Ok(Box::new(Prefix {
                inner: v,
                size: meta.size,
            }))
        }
    }
}

/// The first `size` bytes of a volume.
struct Prefix {
    inner: Box<dyn Volume>,
    size: u64,
}

impl Volume for Prefix {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        crate::volume::check_read(self.size, offset, buf.len(), || self.inner.describe())?;
        self.inner.read_at(offset, buf)
    }

    fn next_data(&self, offset: u64, end: u64) -> Result<Option<Range<u64>>> {
        let end = end.min(self.size);
        if offset >= end {
            return Ok(None);
        }
        Ok(self
            .inner
            .next_data(offset, end)?
            .map(|r| r.start..r.end.min(end))
            .filter(|r| r.start < r.end))
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}
