//! Helpers shared by the cluster-based maps (NTFS, FAT, exFAT): checked reads, a collector
//! that turns used clusters, one by one or as bitmap bytes, into byte ranges of a
//! [`BlockMap`], and the list of clusters the filesystem's own metadata occupies, which a
//! bitmap must mark used before it is trusted.

use super::{BlockMap, FsInfo};
use crate::fs::check::{Checked, MapCheck};
use crate::volume::Volume;

/// Largest single read a map makes; bigger structures (a FAT, a bitmap) are streamed in pieces
/// of this size, so memory stays bounded whatever the volume claims.
pub const PIECE: u64 = 1 << 20;

/// Reads `buf.len()` bytes at `offset`, refusing (with a reason) a range past the volume's end.
pub fn read(vol: &dyn Volume, offset: u64, buf: &mut [u8], what: &str) -> Checked<()> {
    let end = offset
        .checked_add(buf.len() as u64)
        .ok_or_else(|| MapCheck::Overflow {
            what: what.to_string(),
            offset,
        })?;
    if end > vol.size() {
        return Err(MapCheck::PastEnd {
            what: what.to_string(),
            offset,
            end,
            size: vol.size(),
        });
    }
    vol.read_at(offset, buf).map_err(|e| MapCheck::Read {
        what: what.to_string(),
        offset,
        source: Box::new(e),
    })
}

/// What the probe of a cluster-based filesystem reports: `info` with its used bytes (`used`
/// clusters of `cluster` bytes; the whole size when the allocation data is unusable, since
/// every block is then read), and the map alone.
pub fn with_used_bytes(
    mut info: FsInfo,
    map: Checked<(BlockMap, u64)>,
    cluster: u64,
) -> (FsInfo, Checked<BlockMap>) {
    info.used_bytes = map.as_ref().map_or(info.size, |(_, used)| used * cluster);
    (info, map.map(|(m, _)| m))
}

/// Sector 0 of `vol` (where NTFS, FAT and exFAT keep their boot sector); `None` when the
/// volume is shorter than a sector.
pub fn boot_sector(vol: &dyn Volume) -> crate::error::Result<Option<Vec<u8>>> {
    if vol.size() < 512 {
        return Ok(None);
    }
    let mut h = vec![0u8; 512];
    vol.read_at(0, &mut h)?;
    Ok(Some(h))
}

/// Collects used allocation units (clusters) in increasing order and marks them, merged into
/// runs, in a [`BlockMap`] (or only counts them when there is no map).
pub struct UsedRuns<'a> {
    map: Option<&'a mut BlockMap>,
    /// Byte offset of unit 0.
    base: u64,
    /// Bytes per unit.
    unit: u64,
    /// Pending run `[start, end)` in units.
    pending: Option<(u64, u64)>,
    used: u64,
}

impl<'a> UsedRuns<'a> {
    /// Units of `unit` bytes, unit 0 at byte `base`. The caller has checked that every unit it
    /// will add lies inside the volume, so byte offsets cannot overflow.
    pub fn new(map: Option<&'a mut BlockMap>, base: u64, unit: u64) -> UsedRuns<'a> {
        UsedRuns {
            map,
            base,
            unit,
            pending: None,
            used: 0,
        }
    }

    /// Units `[first, first + count)` are used.
    pub fn add(&mut self, first: u64, count: u64) {
        if count == 0 {
            return;
        }
        self.used += count;
        match &mut self.pending {
            Some((_, end)) if *end == first => *end += count,
            _ => {
                self.flush();
                self.pending = Some((first, first + count));
            }
        }
    }

    /// A piece of a bitmap (bit `i` of byte `j`, least significant first, is unit
    /// `first + 8j + i`); only the first `units` bits count.
    pub fn bitmap(&mut self, first: u64, bytes: &[u8], units: u64) {
        let units = units.min(bytes.len() as u64 * 8);
        let mut i = 0u64;
        while i < units {
            let byte = bytes[(i / 8) as usize];
            if i.is_multiple_of(8) && i + 8 <= units && (byte == 0 || byte == 0xFF) {
                if byte == 0xFF {
                    self.add(first + i, 8);
                }
                i += 8;
                continue;
            }
            if byte & (1 << (i % 8)) != 0 {
                self.add(first + i, 1);
            }
            i += 1;
        }
    }

    fn flush(&mut self) {
        if let (Some((start, end)), Some(map)) = (self.pending.take(), self.map.as_deref_mut()) {
            map.mark_bytes(self.base + start * self.unit, (end - start) * self.unit);
        }
    }

    /// Marks what is pending; returns the number of used units.
    pub fn finish(mut self) -> u64 {
        self.flush();
        self.used
    }
}

/// Units (clusters) that the filesystem's own metadata or its files occupy, each with what it
/// holds. A bitmap that marks any of them free is damaged: the map must not be trusted.
#[derive(Debug, Default)]
pub struct Required {
    /// `(first, count, owner)`, sorted by `first` once [`Required::sort`] ran.
    runs: Vec<(u64, u64, Owner)>,
    names: Vec<String>,
    /// The longest run: a run overlapping unit `u` starts after `u - longest`.
    longest: u64,
}

/// What a run holds: a named structure (an index into `Required::names`) or a file's data
/// (its MFT record number), kept small because a volume may have millions of file runs.
#[derive(Debug, Clone, Copy)]
enum Owner {
    Named(usize),
    Record(u64),
}

impl Required {
    /// Units `[first, first + count)` hold `what`.
    pub fn add(&mut self, first: u64, count: u64, what: &str) {
        let id = match self.names.iter().position(|n| n == what) {
            Some(i) => i,
            None => {
                self.names.push(what.to_string());
                self.names.len() - 1
            }
        };
        self.push(first, count, Owner::Named(id));
    }

    /// Units `[first, first + count)` hold an attribute of MFT record `record`.
    pub fn add_record(&mut self, first: u64, count: u64, record: u64) {
        self.push(first, count, Owner::Record(record));
    }

    fn push(&mut self, first: u64, count: u64, owner: Owner) {
        if count > 0 {
            self.runs.push((first, count, owner));
            self.longest = self.longest.max(count);
        }
    }

    /// The runs, as `(first, count)`.
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.runs.iter().map(|&(f, c, _)| (f, c))
    }

    /// Sorts the runs; [`Required::check_bitmap`] needs it.
    pub fn sort(&mut self) {
        self.runs.sort_unstable_by_key(|r| r.0);
    }

    fn describe(&self, owner: Owner) -> String {
        match owner {
            Owner::Named(i) => self.names[i].clone(),
            Owner::Record(n) => format!("an attribute of MFT record {n}"),
        }
    }

    /// Checks a piece of a bitmap (bit `i` of byte `j`, least significant first, is unit
    /// `first + 8j + i`; only the first `units` bits count): every required unit in it must be
    /// set. `bitmap` names the bitmap in the error. The runs must be sorted.
    pub fn check_bitmap(&self, first: u64, bytes: &[u8], units: u64, bitmap: &str) -> Checked<()> {
        let end = first + units.min(bytes.len() as u64 * 8);
        let from = self
            .runs
            .partition_point(|r| r.0.saturating_add(self.longest) <= first);
        for &(start, count, owner) in &self.runs[from..] {
            if start >= end {
                break;
            }
            let lo = start.max(first);
            let hi = start.saturating_add(count).min(end);
            let mut u = lo;
            while u < hi {
                let i = u - first;
                let byte = bytes[(i / 8) as usize];
                if i.is_multiple_of(8) && u + 8 <= hi && byte == 0xFF {
                    u += 8;
                    continue;
                }
                if byte & (1 << (i % 8)) == 0 {
                    return Err(MapCheck::MarkedFree {
                        bitmap: bitmap.to_string(),
                        owner: self.describe(owner),
                        bit: u,
                    });
                }
                u += 1;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_bits_become_merged_byte_ranges() {
        let mut map = BlockMap::new(64 * 1024, 1024);
        let mut r = UsedRuns::new(Some(&mut map), 4096, 1024);
        // units 0, 2..=9 (0xFD = 1111_1101, then 0x03), unit 15 is past `units`.
        r.bitmap(0, &[0xFD, 0x83], 12);
        r.add(20, 2);
        assert_eq!(r.finish(), 1 + 8 + 2);
        let used: Vec<u64> = (0..64).filter(|&b| map.is_used(b)).collect();
        assert_eq!(used, vec![4, 6, 7, 8, 9, 10, 11, 12, 13, 24, 25]);
    }

    #[test]
    fn counting_without_a_map() {
        let mut r = UsedRuns::new(None, 0, 4096);
        r.bitmap(100, &[0xFF, 0xFF, 0x01], 24);
        assert_eq!(r.finish(), 17);
    }

    #[test]
    fn required_units_must_be_set() {
        let mut req = Required::default();
        req.add_record(40, 2, 77);
        req.add(3, 10, "the MFT");
        req.sort();
        // Units 8..16: bits 0..7 of byte 1.
        assert!(req.check_bitmap(8, &[0xFF], 8, "$Bitmap").is_ok());
        assert!(req.check_bitmap(0, &[0xF8, 0x1F], 16, "$Bitmap").is_ok());
        let err = req
            .check_bitmap(0, &[0xF8, 0x1B], 16, "$Bitmap")
            .unwrap_err();
        assert_eq!(err.to_string(), "$Bitmap marks the MFT free (bit 10)");
        // Outside the piece: not checked here.
        assert!(req.check_bitmap(16, &[0], 8, "$Bitmap").is_ok());
        let err = req.check_bitmap(40, &[0x01], 8, "$Bitmap").unwrap_err();
        assert_eq!(
            err.to_string(),
            "$Bitmap marks an attribute of MFT record 77 free (bit 41)"
        );
    }
}
