//! The write path shared by the sparse formats (dynamic VHD, VHDX, qcow2).
//!
//! Each of them maps the virtual disk in fixed-size units (VHD and VHDX blocks, qcow2
//! clusters) to places in the file, or to nothing (the unit reads as zeros). A format
//! implements [`UnitMap`] (look a unit up, allocate, deallocate, write its metadata back);
//! [`SparseWriter`] turns byte-range writes into unit operations:
//!
//! - a write to a mapped unit goes in place; to an unmapped unit, the unit is allocated first,
//!   unless the bytes are all zeros (then nothing is written: the unit keeps reading as zeros);
//! - a write of zeros over a whole mapped unit deallocates it (as `write_zeroes` does);
//! - writes that land in consecutive units placed one after the other in the file go out as one
//!   `pwrite` (the sequential copy path: 256 KiB into 64 KiB qcow2 clusters is one call);
//! - a newly allocated unit at the end of the file reads as zeros outside the written part
//!   because the file is extended, never written with zeros; a unit that reuses freed space has
//!   the parts the write does not cover zeroed first (a punched hole where the filesystem can);
//! - the space of a deallocated unit is released at once (hole punch: it reads as zeros, which
//!   is what the old mapping should read if the process dies before the new metadata is
//!   durable) but is reused only after a sync made the unmapping durable.
//!
//! `sync` is: data `fdatasync`, metadata written, `fdatasync` again (the map orders its own
//! metadata further if it needs to, e.g. qcow2 L2 tables before the L1 table).

use super::ImageWriter;
use super::file::ImageFile;
use crate::error::{Error, Result};
use crate::volume::is_zero;

/// Where a newly allocated unit was placed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Alloc {
    /// File offset of the unit's data.
    pub host: u64,
    /// True when the unit's whole range already reads as zeros (space past the former end of
    /// the file); false for reused space, which may hold old bytes.
    pub fresh: bool,
}

/// A format's mapping from virtual units to the file, with its metadata kept in memory.
pub(crate) trait UnitMap: Send {
    /// Bytes per unit (a power of two).
    fn unit_size(&self) -> u64;
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// File offset of the data of `unit`, when mapped.
    fn lookup(&mut self, file: &ImageFile, unit: u64) -> Result<Option<u64>>;
    /// Maps the unmapped `unit` to newly allocated space.
    fn allocate(&mut self, file: &ImageFile, unit: u64) -> Result<Alloc>;
    /// Unmaps `unit` (it reads as zeros from now on); returns the file offset its data had.
    /// That space must not be handed out again before [`UnitMap::durable`].
    fn deallocate(&mut self, file: &ImageFile, unit: u64) -> Result<Option<u64>>;
    /// Writes the metadata changed since the last call. Everything written before is durable.
    fn flush(&mut self, file: &ImageFile) -> Result<()>;
    /// The metadata written by the last [`UnitMap::flush`] is durable.
    fn durable(&mut self);
    /// Writes the final metadata; called after a complete sync. The writer syncs afterwards.
    /// Nothing by default (formats whose metadata is complete after every flush).
    fn finish(&mut self, _file: &ImageFile) -> Result<()> {
        Ok(())
    }
    /// True when enough deallocated space waits for a sync that one should be done now (bounds
    /// the memory that tracks it).
    fn wants_sync(&self) -> bool {
        false
    }
}

/// Deallocated units waiting for reuse: their space is handed out again only after a sync
/// made the unmapping durable (VHD and VHDX blocks; qcow2 tracks clusters in its own bitmap).
#[derive(Debug, Default)]
pub(crate) struct FreeList {
    /// Deallocated since the last flush.
    pending: Vec<u64>,
    /// Deallocated, unmapping durable: free for reuse.
    free: Vec<u64>,
}

/// Most deallocations a map keeps pending before it asks for a sync
/// ([`UnitMap::wants_sync`]).
pub(crate) const MAX_PENDING: usize = 65536;

impl FreeList {
    /// Remembers the space at `host`, just unmapped.
    pub fn release(&mut self, host: u64) {
        self.pending.push(host);
    }

    /// Space free for reuse, if any.
    pub fn take(&mut self) -> Option<u64> {
        self.free.pop()
    }

    /// The unmappings so far are durable: their space can be reused.
    pub fn durable(&mut self) {
        self.free.append(&mut self.pending);
    }

    /// True when enough space waits for a sync ([`UnitMap::wants_sync`]).
    pub fn wants_sync(&self) -> bool {
        self.pending.len() > MAX_PENDING
    }
}

/// An [`ImageWriter`] over any [`UnitMap`].
pub(crate) struct SparseWriter<M> {
    file: ImageFile,
    map: M,
}

/// A pending write of `data[start..end]` at file offset `host`.
struct Run {
    host: u64,
    start: usize,
    end: usize,
}

impl<M: UnitMap> SparseWriter<M> {
    pub fn new(file: ImageFile, map: M) -> Self {
        SparseWriter { file, map }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<u64> {
        let size = self.map.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(end),
            _ => Err(Error::OutOfRange {
                op: "write",
                object: format!("image {}", self.file.path().display()),
                offset,
                len,
                size,
            }),
        }
    }

    fn deallocate(&mut self, unit: u64) -> Result<()> {
        if let Some(host) = self.map.deallocate(&self.file, unit)? {
            self.file.discard(host, self.map.unit_size())?;
        }
        Ok(())
    }

    fn flush_run(&self, run: &mut Option<Run>, data: &[u8]) -> Result<()> {
        if let Some(r) = run.take() {
            self.file.write_all_at(r.host, &data[r.start..r.end])?;
        }
        Ok(())
    }

    fn sync_now(&mut self) -> Result<()> {
        self.file.sync()?;
        self.map.flush(&self.file)?;
        self.file.sync()?;
        self.map.durable();
        Ok(())
    }
}

impl<M: UnitMap> ImageWriter for SparseWriter<M> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let end = self.check_range(offset, data.len() as u64)?;
        let us = self.map.unit_size();
        let size = self.map.size();
        let mut run: Option<Run> = None;
        let mut pos = offset;
        while pos < end {
            let unit = pos / us;
            let ustart = unit * us;
            let piece_end = end.min(ustart + us);
            let (ps, pe) = ((pos - offset) as usize, (piece_end - offset) as usize);
            let piece = &data[ps..pe];
            let whole = pos == ustart && piece_end >= (ustart + us).min(size);
            let within = pos - ustart;
            let host = match self.map.lookup(&self.file, unit)? {
                Some(h) => {
                    if whole && is_zero(piece) {
                        self.flush_run(&mut run, data)?;
                        self.deallocate(unit)?;
                        pos = piece_end;
                        continue;
                    }
                    h
                }
                None => {
                    if is_zero(piece) {
                        pos = piece_end;
                        continue;
                    }
                    let a = self.map.allocate(&self.file, unit)?;
                    if !a.fresh && !whole {
                        let after = within + piece.len() as u64;
                        self.file.zero(a.host, within)?;
                        self.file.zero(a.host + after, us - after)?;
                    }
                    a.host
                }
            };
            let hpos = host + within;
            match &mut run {
                Some(r) if r.host + (r.end - r.start) as u64 == hpos && r.end == ps => r.end = pe,
                _ => {
                    self.flush_run(&mut run, data)?;
                    run = Some(Run {
                        host: hpos,
                        start: ps,
                        end: pe,
                    });
                }
            }
            pos = piece_end;
        }
        self.flush_run(&mut run, data)?;
        if self.map.wants_sync() {
            self.sync_now()?;
        }
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        let end = self.check_range(offset, len)?;
        let us = self.map.unit_size();
        let size = self.map.size();
        let mut pos = offset;
        while pos < end {
            let unit = pos / us;
            let ustart = unit * us;
            let piece_end = end.min(ustart + us);
            if let Some(host) = self.map.lookup(&self.file, unit)? {
                if pos == ustart && piece_end >= (ustart + us).min(size) {
                    self.deallocate(unit)?;
                } else {
                    self.file.zero(host + (pos - ustart), piece_end - pos)?;
                }
            }
            pos = piece_end;
            if self.map.wants_sync() {
                self.sync_now()?;
            }
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        self.sync_now()
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        self.sync_now()?;
        self.map.finish(&self.file)?;
        self.file.sync()
    }
}
