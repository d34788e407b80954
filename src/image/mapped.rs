//! The read path shared by the sparse formats: a [`Mapping`] says where each unit (block or
//! cluster) of the virtual disk is in the file; [`MappedVolume`] turns that into a [`Volume`]
//! whose `next_data` skips unmapped units (and holes inside mapped ones).
//!
//! Mappings read their tables from the file on demand (the page cache keeps them warm), so
//! opening a huge or hostile image allocates nothing in proportion to what it claims.

use super::file::ImageFile;
use crate::error::{Error, Result};
use crate::volume::Volume;
use std::ops::Range;

/// Where one unit's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unit {
    /// Reads as zeros.
    Zero,
    /// The unit's data starts at this file offset.
    Data(u64),
    /// VHD: data at `host`, but only the sectors whose bit is set in the sector bitmap at
    /// `bitmap` are present (the others read as zeros).
    Sectors { host: u64, bitmap: u64 },
    /// Present, but stored in a way volback does not read (compressed qcow2 clusters).
    Unsupported(&'static str),
}

/// Most units looked up at once.
pub(crate) const LOOKUP_BATCH: u64 = 4096;

/// A format's read-only view of its block table.
pub(crate) trait Mapping: Send + Sync {
    /// Bytes per unit (a power of two).
    fn unit_size(&self) -> u64;
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Appends to `out` the mapping of units `first`, `first + 1`, … : at least one and at most
    /// `max` (fewer when a table ends). Every returned [`Unit::Data`] range lies inside the file
    /// and outside the format's own structures.
    fn lookup(&self, file: &ImageFile, first: u64, max: u64, out: &mut Vec<Unit>) -> Result<()>;
    /// "qcow2 image", "VHDX image", … for descriptions.
    fn kind(&self) -> &'static str;
}

/// An image read through its [`Mapping`].
pub(crate) struct MappedVolume<M> {
    file: ImageFile,
    map: M,
}

impl<M: Mapping> MappedVolume<M> {
    pub fn new(file: ImageFile, map: M) -> Self {
        MappedVolume { file, map }
    }

    fn units(&self, first: u64, count: u64) -> Result<Vec<Unit>> {
        let mut out = Vec::with_capacity(count.min(LOOKUP_BATCH) as usize);
        while (out.len() as u64) < count {
            let before = out.len();
            let next = first + before as u64;
            let want = (count - before as u64).min(LOOKUP_BATCH);
            self.map.lookup(&self.file, next, want, &mut out)?;
            if out.len() == before {
                return Err(Error::internal(
                    "image reader",
                    format!(
                        "no mapping returned for unit {next} of {}",
                        self.file.path().display()
                    ),
                ));
            }
            out.truncate(before + want as usize);
        }
        Ok(out)
    }

    /// Reads `buf.len()` bytes of a unit with a sector bitmap: sectors whose bit is clear
    /// read as zeros.
    fn read_sectors(&self, host: u64, bitmap: u64, within: u64, buf: &mut [u8]) -> Result<()> {
        const SECTOR: u64 = 512;
        self.file.read_exact_at(host + within, buf, "data block")?;
        let first = within / SECTOR;
        let last = (within + buf.len() as u64 - 1) / SECTOR;
        let mut bits = vec![0u8; (last / 8 - first / 8 + 1) as usize];
        self.file
            .read_exact_at(bitmap + first / 8, &mut bits, "sector bitmap")?;
        for s in first..=last {
            let byte = bits[(s / 8 - first / 8) as usize];
            // VHD bitmaps are big-endian bit order: the first sector is the top bit.
            if byte & (0x80 >> (s % 8)) == 0 {
                let a = (s * SECTOR).max(within) - within;
                let b = ((s + 1) * SECTOR).min(within + buf.len() as u64) - within;
                buf[a as usize..b as usize].fill(0);
            }
        }
        Ok(())
    }
}

impl<M: Mapping> Volume for MappedVolume<M> {
    fn size(&self) -> u64 {
        self.map.size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let size = self.map.size();
        let end = match offset.checked_add(buf.len() as u64) {
            Some(e) if e <= size => e,
            _ => {
                return Err(Error::read_out_of_range(
                    self.describe(),
                    offset,
                    buf.len() as u64,
                    size,
                ));
            }
        };
        if buf.is_empty() {
            return Ok(());
        }
        let us = self.map.unit_size();
        let first = offset / us;
        let units = self.units(first, (end - 1) / us - first + 1)?;
        // A run of data units placed one after the other in the file is read in one call.
        let mut run: Option<(u64, usize, usize)> = None;
        let mut pos = offset;
        for (i, unit) in units.iter().enumerate() {
            let ustart = (first + i as u64) * us;
            let piece_end = end.min(ustart + us);
            let within = pos - ustart;
            let (bs, be) = ((pos - offset) as usize, (piece_end - offset) as usize);
            if let Unit::Data(host) = unit {
                let h = host + within;
                match &mut run {
                    Some((rh, rs, re)) if *rh + (*re - *rs) as u64 == h && *re == bs => *re = be,
                    _ => {
                        if let Some((rh, rs, re)) = run.take() {
                            self.file
                                .read_exact_at(rh, &mut buf[rs..re], "data block")?;
                        }
                        run = Some((h, bs, be));
                    }
                }
                pos = piece_end;
                continue;
            }
            if let Some((rh, rs, re)) = run.take() {
                self.file
                    .read_exact_at(rh, &mut buf[rs..re], "data block")?;
            }
            match *unit {
                Unit::Zero => buf[bs..be].fill(0),
                Unit::Sectors { host, bitmap } => {
                    self.read_sectors(host, bitmap, within, &mut buf[bs..be])?
                }
                Unit::Unsupported(why) => {
                    return Err(self
                        .file
                        .unsupported(format!("the data at virtual offset {ustart} is {why}")));
                }
                Unit::Data(_) => {}
            }
            pos = piece_end;
        }
        if let Some((rh, rs, re)) = run.take() {
            self.file
                .read_exact_at(rh, &mut buf[rs..re], "data block")?;
        }
        Ok(())
    }

    fn next_data(&self, offset: u64, end: u64) -> Result<Option<Range<u64>>> {
        let end = end.min(self.map.size());
        let us = self.map.unit_size();
        let mut pos = offset;
        while pos < end {
            let first = pos / us;
            let count = ((end - 1) / us - first + 1).min(LOOKUP_BATCH);
            let units = self.units(first, count)?;
            let mut i = 0usize;
            while i < units.len() {
                let ustart = (first + i as u64) * us;
                let from = pos.max(ustart);
                let host_of = |u: &Unit| match *u {
                    Unit::Data(h) | Unit::Sectors { host: h, .. } => Some(h),
                    _ => None,
                };
                match units[i] {
                    Unit::Zero => {
                        i += 1;
                    }
                    Unit::Unsupported(_) => {
                        return Ok(Some(from..end.min(ustart + us)));
                    }
                    Unit::Data(h) | Unit::Sectors { host: h, .. } => {
                        // Extend over following units placed right after this one.
                        let mut j = i + 1;
                        while j < units.len() && host_of(&units[j]) == Some(h + (j - i) as u64 * us)
                        {
                            j += 1;
                        }
                        let vend = end.min((first + j as u64) * us);
                        let hstart = h + (from - ustart);
                        let hend = h + (vend - ustart);
                        if let Some((ds, de)) = self.file.next_data(hstart, hend)? {
                            let ds = ds.clamp(hstart, hend);
                            let de = de.clamp(ds, hend);
                            if de > ds {
                                return Ok(Some(ustart + (ds - h)..ustart + (de - h)));
                            }
                        }
                        i = j;
                    }
                }
            }
            pos = (first + units.len() as u64) * us;
        }
        Ok(None)
    }

    fn describe(&self) -> String {
        format!("{} {}", self.map.kind(), self.file.path().display())
    }
}
