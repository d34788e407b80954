//! A snapshot as a [`Volume`]: random access to its bytes, served from the chunk store.

use super::chunks::ChunkStore;
use super::format::{BlockRef, SEGMENT_BLOCKS};
use super::snapshot::SnapshotFile;
use crate::error::{Error, Result};
use crate::volume::Volume;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// How many decoded manifest segments a reader keeps (about 2 MiB each).
const CACHED_SEGMENTS: usize = 4;

/// Read access to one snapshot.
pub struct SnapshotVolume {
    snap: SnapshotFile,
    chunks: ChunkStore,
    segments: Mutex<Vec<(usize, Arc<Vec<BlockRef>>)>>,
}

impl SnapshotVolume {
    pub fn new(snap: SnapshotFile, chunks: ChunkStore) -> SnapshotVolume {
        SnapshotVolume {
            snap,
            chunks,
            segments: Mutex::new(Vec::new()),
        }
    }

    pub fn snapshot(&self) -> &SnapshotFile {
        &self.snap
    }

    pub fn block_size(&self) -> u64 {
        self.snap.header().block_size as u64
    }

    pub fn chunks(&self) -> &ChunkStore {
        &self.chunks
    }

    fn segment(&self, index: usize) -> Result<Arc<Vec<BlockRef>>> {
        {
            let cache = self.segments.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, s)) = cache.iter().find(|(i, _)| *i == index) {
                return Ok(s.clone());
            }
        }
        let seg = Arc::new(self.snap.segment(index)?);
        let mut cache = self.segments.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHED_SEGMENTS {
            cache.remove(0);
        }
        cache.push((index, seg.clone()));
        Ok(seg)
    }

    /// The reference of block `index`.
    pub fn block_ref(&self, index: u64) -> Result<BlockRef> {
        if index >= self.snap.header().block_count {
            return Err(Error::InvalidArgument(format!(
                "block {index} is past the end of snapshot {}",
                self.snap.id()
            )));
        }
        let seg = self.segment((index / SEGMENT_BLOCKS) as usize)?;
        Ok(seg[(index % SEGMENT_BLOCKS) as usize])
    }

    /// Reads block `index` whole into `buf` (resized to the block's length).
    /// Returns the block's reference.
    pub fn read_block(&self, index: u64, buf: &mut Vec<u8>) -> Result<BlockRef> {
        let r = self.block_ref(index)?;
        let bs = self.block_size();
        let len = (self.size() - index * bs).min(bs) as usize;
        match r {
            BlockRef::Zero | BlockRef::Unused => {
                buf.clear();
                buf.resize(len, 0);
            }
            BlockRef::Chunk(id) => {
                self.chunks.get_into(&id, buf)?;
                if buf.len() != len {
                    return Err(Error::corrupt(
                        format!("chunk {id}"),
                        self.chunks.path(&id),
                        format!(
                            "holds {} bytes but block {index} of snapshot {} has {len}",
                            buf.len(),
                            self.snap.id()
                        ),
                    ));
                }
            }
        }
        Ok(r)
    }
}

impl Volume for SnapshotVolume {
    fn size(&self) -> u64 {
        self.snap.header().source.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let size = self.size();
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > size)
        {
            return Err(Error::InvalidArgument(format!(
                "read of {} bytes at offset {offset} is past the end of snapshot {} ({size} bytes)",
                buf.len(),
                self.snap.id()
            )));
        }
        let bs = self.block_size();
        let mut done = 0usize;
        let mut block = Vec::new();
        while done < buf.len() {
            let pos = offset + done as u64;
            let index = pos / bs;
            let within = (pos % bs) as usize;
            let n = (bs as usize - within).min(buf.len() - done);
            match self.block_ref(index)? {
                BlockRef::Zero | BlockRef::Unused => buf[done..done + n].fill(0),
                BlockRef::Chunk(_) => {
                    self.read_block(index, &mut block)?;
                    buf[done..done + n].copy_from_slice(&block[within..within + n]);
                }
            }
            done += n;
        }
        Ok(())
    }

    fn next_data(&self, offset: u64, end: u64) -> Result<Option<Range<u64>>> {
        let size = self.size();
        let end = end.min(size);
        if offset >= end {
            return Ok(None);
        }
        let bs = self.block_size();
        let last = (end - 1) / bs;
        let mut i = offset / bs;
        while i <= last && !matches!(self.block_ref(i)?, BlockRef::Chunk(_)) {
            i += 1;
        }
        if i > last {
            return Ok(None);
        }
        let start = (i * bs).max(offset);
        let mut j = i + 1;
        while j <= last && matches!(self.block_ref(j)?, BlockRef::Chunk(_)) {
            j += 1;
        }
        Ok(Some(start..(j * bs).min(end)))
    }

    fn describe(&self) -> String {
        format!("snapshot {}", &self.snap.id()[..12])
    }
}
