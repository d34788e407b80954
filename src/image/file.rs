//! The image file itself: positioned reads and writes with error context, and small helpers
//! shared by the format modules (table reads, layout checks, sizes, bit sets, dirty pages).

use super::error::ParseError;
use crate::error::{Error, IoContext, Result};
use crate::platform;
use std::fs::{File, OpenOptions};
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};

/// An open image file and its path (for error messages).
#[derive(Debug)]
pub(crate) struct ImageFile {
    file: File,
    path: PathBuf,
}

impl ImageFile {
    /// Creates `path`, which must not exist, for reading and writing.
    pub fn create_new(path: &Path) -> Result<ImageFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .ctx("create image", path)?;
        Ok(ImageFile {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Opens an existing image for reading and writing.
    pub fn open_rw(path: &Path) -> Result<ImageFile> {
        let file = platform::open_write_existing(path).ctx("open image", path)?;
        Ok(ImageFile {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Opens an existing image read-only.
    pub fn open_ro(path: &Path) -> Result<ImageFile> {
        let file = platform::open_read_only(path).ctx("open image", path)?;
        Ok(ImageFile {
            file,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Current length of the file.
    pub fn len(&self) -> Result<u64> {
        Ok(self
            .file
            .metadata()
            .ctx("read the size of", &self.path)?
            .len())
    }

    /// The error of `op` at `offset` in this file, from its I/O error.
    fn io_at(&self, op: &'static str, offset: u64) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::IoAt {
            op,
            path: self.path.clone(),
            offset,
            source,
        }
    }

    /// Reads up to `buf.len()` bytes at `offset`; returns how many were read (fewer only at
    /// the end of the file).
    pub fn read_at_most(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        platform::read_up_to_at(&self.file, buf, offset).map_err(self.io_at("read", offset))
    }

    /// Reads exactly `buf.len()` bytes at `offset`. A file that ends first is corrupt
    /// (truncated): the error names `what` was being read.
    pub fn read_exact_at(&self, offset: u64, buf: &mut [u8], what: &str) -> Result<()> {
        let n = self.read_at_most(offset, buf)?;
        if n < buf.len() {
            return Err(Error::corrupt(
                what,
                &self.path,
                format!(
                    "the file ends at byte {} but {} bytes are needed at offset {offset} \
                     (truncated image)",
                    offset + n as u64,
                    buf.len()
                ),
            ));
        }
        Ok(())
    }

    /// Reads a table of `count` entries of `N` bytes at `offset`, each decoded by `decode`
    /// (`u32::from_be_bytes`, …). A file that ends first is corrupt, as in
    /// [`ImageFile::read_exact_at`].
    pub fn read_table<T, const N: usize>(
        &self,
        offset: u64,
        count: u64,
        what: &str,
        decode: impl Fn([u8; N]) -> T,
    ) -> Result<Vec<T>> {
        let mut raw = vec![0u8; count as usize * N];
        self.read_exact_at(offset, &mut raw, what)?;
        Ok(raw
            .chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                decode(a)
            })
            .collect())
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_all_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        platform::write_all_at(&self.file, buf, offset).map_err(self.io_at("write", offset))
    }

    /// Sets the file length (extending with zeros, which the filesystem keeps as a hole).
    pub fn set_len(&self, len: u64) -> Result<()> {
        self.file.set_len(len).ctx("resize", &self.path)
    }

    /// Makes the file's data (and its length) durable.
    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().ctx("flush", &self.path)
    }

    /// Makes `[offset, offset+len)` read as zeros: a hole where the filesystem can punch one,
    /// written zeros otherwise.
    pub fn zero(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        platform::zero_range(&self.file, offset, len).map_err(self.io_at("zero", offset))
    }

    /// Releases the space of `[offset, offset+len)` if the filesystem can punch a hole (the
    /// range then reads as zeros); does nothing otherwise. For space no longer referenced.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        platform::punch_hole(&self.file, offset, len)
            .map_err(self.io_at("release space in", offset))?;
        Ok(())
    }

    /// The next range at or after `offset` (below `end`) that the filesystem says may hold
    /// data (SEEK_DATA); the whole range where holes are not reported.
    pub fn next_data(&self, offset: u64, end: u64) -> Result<Option<(u64, u64)>> {
        platform::next_data(&self.file, offset, end).map_err(self.io_at("look for data in", offset))
    }

    /// A [`Error::Corrupt`] about this file.
    pub fn corrupt(&self, what: impl Into<String>, detail: impl Into<String>) -> Error {
        Error::corrupt(what, &self.path, detail)
    }

    /// An [`Error::UnsupportedImage`] about this file.
    pub fn unsupported(&self, detail: impl Into<String>) -> Error {
        Error::UnsupportedImage {
            path: self.path.clone(),
            detail: detail.into(),
        }
    }

    /// The error for a structure `what` ("VHD footer", …) of this file that a parser
    /// rejected: [`Error::UnsupportedImage`] for a feature volback does not handle,
    /// [`Error::Corrupt`] otherwise.
    pub fn rejected(&self, what: impl Into<String>, e: ParseError) -> Error {
        match e {
            ParseError::Unsupported { detail, .. } => self.unsupported(detail),
            e => self.corrupt(what, e.to_string()),
        }
    }

    /// Checks that a block or cluster at file offset `off`, of `extent` bytes of which the
    /// first `need` must be inside the file (`file_len` bytes), is clear of the image's own
    /// structures (`reserved`). `what` names the table entry that placed it, `unit` says
    /// "block" or "cluster".
    pub fn check_placement(
        &self,
        what: impl Fn() -> String,
        unit: &str,
        off: u64,
        (need, extent): (u64, u64),
        file_len: u64,
        reserved: &[Range<u64>],
    ) -> Result<()> {
        let end = off.saturating_add(need);
        if end > file_len {
            return Err(self.corrupt(
                what(),
                format!(
                    "{unit} at offset {off} ends at {end}, past the end of the file \
                     ({file_len} bytes)"
                ),
            ));
        }
        if let Some(o) = clash(reserved, &(off..off.saturating_add(extent))) {
            return Err(self.corrupt(
                what(),
                format!(
                    "{unit} at offset {off} overlaps the image's own structures at {}..{}",
                    o.start, o.end
                ),
            ));
        }
        Ok(())
    }

    /// Checks that no two blocks of `blocks` (file offset, block number), each `len` bytes
    /// long, overlap; sorts `blocks` by offset. `what` names the table ("VHDX BAT", …).
    pub fn check_disjoint(&self, what: &str, blocks: &mut [(u64, u64)], len: u64) -> Result<()> {
        blocks.sort_unstable();
        for w in blocks.windows(2) {
            if w[0].0 + len > w[1].0 {
                return Err(self.corrupt(what, format!("blocks {} and {} overlap", w[0].1, w[1].1)));
            }
        }
        Ok(())
    }
}

/// True when the ranges share a byte (an empty range shares none).
pub(crate) fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    !a.is_empty() && !b.is_empty() && a.start < b.end && b.start < a.end
}

/// The first of `reserved` that `r` overlaps.
pub(crate) fn clash<'a>(reserved: &'a [Range<u64>], r: &Range<u64>) -> Option<&'a Range<u64>> {
    reserved.iter().find(|o| overlaps(o, r))
}

/// The virtual size of an image for a volume of `size` bytes: whole 512-byte sectors, as
/// [`ImageFormat::virtual_size`](super::ImageFormat::virtual_size) says; `None` above `max`.
pub(crate) fn whole_sectors(size: u64, max: u64) -> Option<u64> {
    round_up(size, 512).filter(|&s| s <= max)
}

/// True when `x` is a power of two inside `range` (block and cluster sizes).
pub(crate) fn power_of_two_in(x: u64, range: RangeInclusive<u64>) -> bool {
    x.is_power_of_two() && range.contains(&x)
}

/// The check every `open_for_update` makes: the image's virtual size is the one expected.
pub(crate) fn check_virtual_size(path: &Path, found: u64, expected: u64) -> Result<()> {
    if found != expected {
        return Err(Error::ImageSizeMismatch {
            path: path.to_path_buf(),
            found,
            expected,
        });
    }
    Ok(())
}

/// `x` rounded up to a multiple of `to` (a power of two); `None` on overflow.
pub(crate) fn round_up(x: u64, to: u64) -> Option<u64> {
    debug_assert!(to.is_power_of_two());
    x.checked_add(to - 1).map(|v| v & !(to - 1))
}

/// A fixed-size bit set (one bit per cluster or block).
#[derive(Debug, Clone, Default)]
pub(crate) struct BitSet {
    words: Vec<u64>,
    len: u64,
}

impl BitSet {
    pub fn new(len: u64) -> BitSet {
        BitSet {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }

    /// Grows the set to at least `len` bits (new bits clear).
    pub fn grow(&mut self, len: u64) {
        if len > self.len {
            self.words.resize(len.div_ceil(64) as usize, 0);
            self.len = len;
        }
    }

    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Sets bit `i` (growing the set); returns its previous value.
    pub fn set(&mut self, i: u64) -> bool {
        self.grow(i + 1);
        let w = &mut self.words[(i / 64) as usize];
        let old = *w & (1 << (i % 64)) != 0;
        *w |= 1 << (i % 64);
        old
    }

    pub fn clear(&mut self, i: u64) {
        if i < self.len {
            self.words[(i / 64) as usize] &= !(1 << (i % 64));
        }
    }

    /// The first clear bit at or after `from` and below `len()`.
    pub fn first_clear(&self, from: u64) -> Option<u64> {
        let mut i = from;
        while i < self.len {
            let w = self.words[(i / 64) as usize] | ((1u64 << (i % 64)) - 1);
            if w != u64::MAX {
                let bit = (i / 64) * 64 + (!w).trailing_zeros() as u64;
                return (bit < self.len).then_some(bit);
            }
            i = (i / 64 + 1) * 64;
        }
        None
    }

    /// One past the highest set bit (0 when none is set).
    pub fn end(&self) -> u64 {
        for (wi, &w) in self.words.iter().enumerate().rev() {
            if w != 0 {
                return wi as u64 * 64 + 64 - w.leading_zeros() as u64;
            }
        }
        0
    }

    /// True when any bit in `[from, to)` is set.
    pub fn any_in(&self, from: u64, to: u64) -> bool {
        let to = to.min(self.len);
        let mut i = from;
        while i < to {
            if i.is_multiple_of(64) && to - i >= 64 {
                if self.words[(i / 64) as usize] != 0 {
                    return true;
                }
                i += 64;
            } else {
                if self.get(i) {
                    return true;
                }
                i += 1;
            }
        }
        false
    }
}

/// Dirty regions of an in-memory table that is written back in pages.
#[derive(Debug, Default)]
pub(crate) struct DirtyPages {
    pages: std::collections::BTreeSet<u64>,
}

impl DirtyPages {
    /// Marks the page holding byte `byte_offset` of the table.
    pub fn mark(&mut self, byte_offset: u64, page_size: u64) {
        self.pages.insert(byte_offset / page_size);
    }

    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Writes the dirty pages of a table of fixed-size entries stored at `table_offset` in
    /// `file` (pages of `page_size` bytes, the last one cut at the table's end), each entry
    /// encoded by `encode`, and forgets them.
    pub fn write_back<T: Copy, const N: usize>(
        &mut self,
        file: &ImageFile,
        table_offset: u64,
        page_size: u64,
        entries: &[T],
        encode: impl Fn(T) -> [u8; N],
    ) -> Result<()> {
        let total = entries.len() as u64 * N as u64;
        for (first, end) in self.take_runs() {
            let from = first * page_size;
            let to = (end * page_size).min(total);
            let raw: Vec<u8> = entries[(from / N as u64) as usize..(to / N as u64) as usize]
                .iter()
                .flat_map(|&e| encode(e))
                .collect();
            file.write_all_at(table_offset + from, &raw)?;
        }
        Ok(())
    }

    /// Takes the dirty pages as runs of consecutive page numbers `[first, end)`.
    pub fn take_runs(&mut self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for p in std::mem::take(&mut self.pages) {
            match runs.last_mut() {
                Some(r) if r.1 == p => r.1 = p + 1,
                _ => runs.push((p, p + 1)),
            }
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitset_operations() {
        let mut b = BitSet::new(10);
        assert_eq!(b.first_clear(0), Some(0));
        assert_eq!(b.end(), 0);
        for i in 0..10 {
            b.set(i);
        }
        assert_eq!(b.first_clear(0), None);
        b.set(200);
        assert_eq!(b.len, 201);
        assert_eq!(b.end(), 201);
        assert_eq!(b.first_clear(0), Some(10));
        assert_eq!(b.first_clear(64), Some(64));
        b.clear(5);
        assert_eq!(b.first_clear(0), Some(5));
        assert!(b.any_in(0, 5));
        assert!(!b.any_in(10, 200));
        assert!(b.any_in(10, 201));
        assert!(!b.set(150));
        assert!(b.set(150));
    }

    #[test]
    fn dirty_page_runs() {
        let mut d = DirtyPages::default();
        for off in [0u64, 10, 4096, 3 * 4096 + 5, 4 * 4096] {
            d.mark(off, 4096);
        }
        assert_eq!(d.take_runs(), vec![(0, 2), (3, 5)]);
        assert!(d.is_empty());
    }

    #[test]
    fn ranges_and_sizes() {
        assert!(overlaps(&(0..10), &(9..20)));
        assert!(!overlaps(&(0..10), &(10..20)));
        assert!(!overlaps(&(0..10), &(5..5)));
        assert_eq!(clash(&[0..4, 8..12], &(10..11)), Some(&(8..12)));
        assert_eq!(whole_sectors(1, 1024), Some(512));
        assert_eq!(whole_sectors(1025, 1024), None);
        assert_eq!(whole_sectors(u64::MAX, u64::MAX), None);
        assert!(power_of_two_in(4096, 512..=4096));
        assert!(!power_of_two_in(3000, 512..=4096));
        assert!(!power_of_two_in(8192, 512..=4096));
    }

    #[test]
    fn rounding() {
        assert_eq!(round_up(0, 512), Some(0));
        assert_eq!(round_up(1, 512), Some(512));
        assert_eq!(round_up(512, 512), Some(512));
        assert_eq!(round_up(u64::MAX, 512), None);
    }
}
