//! Writing a VHD: creating fixed and dynamic images, updating them in place, allocating and
//! freeing blocks of a dynamic one.

use super::check::{BlockBounds, open_checked};
use super::footer::{
    BAT_UNUSED, BLOCK_SIZES, DISK_DYNAMIC, DISK_FIXED, DYN_HEADER_OFFSET, DynHeader, FOOTER_SIZE,
    Footer, MAX_SIZE, SECTOR,
};
use crate::error::{Error, Result};
use crate::image::file::{
    BitSet, DirtyPages, ImageFile, check_virtual_size, power_of_two_in, round_up, whole_sectors,
};
use crate::image::sparse::{Alloc, FreeList, SparseWriter, UnitMap};
use crate::image::{CreateOptions, ImageWriter};
use std::path::Path;

/// Block size Windows and qemu use for dynamic VHDs.
pub(crate) const DEFAULT_BLOCK_SIZE: u64 = 2 << 20;
/// Where volback puts the BAT (after the footer copy and the dynamic header).
const BAT_OFFSET: u64 = 1536;
/// Largest BAT volback loads into memory to update an image (64 MiB).
const MAX_WRITER_BAT_ENTRIES: u64 = 1 << 24;

/// Virtual size of a VHD for a volume of `size` bytes: whole sectors.
pub(crate) fn image_size(path: &Path, size: u64) -> Result<u64> {
    whole_sectors(size, MAX_SIZE).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "cannot make {} a VHD of {size} bytes: VHD images hold at most 2040 GiB \
             ({MAX_SIZE} bytes); use VHDX or qcow2",
            path.display()
        ))
    })
}

/// A fixed VHD writer: writes go straight to the file; zeros are holes.
struct FixedWriter {
    file: ImageFile,
    size: u64,
}

impl FixedWriter {
    fn check(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(Error::OutOfRange {
                op: "write",
                object: format!("image {}", self.file.path().display()),
                offset,
                len,
                size: self.size,
            });
        }
        Ok(())
    }
}

impl ImageWriter for FixedWriter {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.check(offset, data.len() as u64)?;
        if crate::volume::is_zero(data) {
            return self.file.zero(offset, data.len() as u64);
        }
        self.file.write_all_at(offset, data)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)?;
        self.file.zero(offset, len)
    }

    fn sync(&mut self) -> Result<()> {
        self.file.sync()
    }

    fn finish(self: Box<Self>) -> Result<()> {
        self.file.sync()
    }
}

/// Creates a fixed VHD: a sparse file of the virtual size followed by the footer.
pub(crate) fn create_fixed(path: &Path, size: u64) -> Result<Box<dyn ImageWriter>> {
    let size = image_size(path, size)?;
    let file = ImageFile::create_new(path)?;
    file.set_len(size + FOOTER_SIZE)?;
    file.write_all_at(size, &Footer::new(size, DISK_FIXED).encode())?;
    file.sync()?;
    Ok(Box::new(FixedWriter { file, size }))
}

/// The in-memory state of a dynamic VHD being written.
struct DynWriter {
    footer: [u8; 512],
    size: u64,
    block_size: u64,
    bitmap_size: u64,
    bat_offset: u64,
    bat: Vec<u32>,
    dirty: DirtyPages,
    /// Where the next block goes; the footer is written here at each flush.
    data_end: u64,
    /// Where the last flush wrote the footer.
    footer_at: u64,
    /// Bitmap offsets of deallocated blocks.
    free: FreeList,
    /// Blocks known to have every bit of their sector bitmap set.
    full_bitmap: BitSet,
}

impl DynWriter {
    fn new(footer: [u8; 512], size: u64, h: &DynHeader, bat: Vec<u32>, data_end: u64) -> Self {
        DynWriter {
            footer,
            size,
            block_size: h.block_size as u64,
            bitmap_size: h.bitmap_size(),
            bat_offset: h.table_offset,
            full_bitmap: BitSet::new(bat.len() as u64),
            bat,
            dirty: DirtyPages::default(),
            data_end,
            footer_at: data_end,
            free: FreeList::default(),
        }
    }

    fn all_ones_bitmap(&self) -> Vec<u8> {
        vec![0xFF; self.bitmap_size as usize]
    }

    /// Makes every sector of an existing block "present": sectors whose bit is clear may hold
    /// anything but must read as zeros, so they are zeroed before the bitmap says otherwise.
    /// (Blocks written by volback and qemu always have a full bitmap.)
    fn fill_bitmap(&mut self, file: &ImageFile, unit: u64, start: u64) -> Result<()> {
        let mut bits = vec![0u8; self.bitmap_size as usize];
        file.read_exact_at(start, &mut bits, "VHD sector bitmap")?;
        let sectors = self.block_size / SECTOR;
        let bit = |s: u64| bits[(s / 8) as usize] & (0x80 >> (s % 8)) != 0;
        let mut changed = false;
        let mut s = 0;
        while s < sectors {
            if bit(s) {
                s += 1;
                continue;
            }
            let from = s;
            while s < sectors && !bit(s) {
                s += 1;
            }
            file.zero(
                start + self.bitmap_size + from * SECTOR,
                (s - from) * SECTOR,
            )?;
            changed = true;
        }
        if changed {
            file.sync()?;
            file.write_all_at(start, &self.all_ones_bitmap())?;
        }
        self.full_bitmap.set(unit);
        Ok(())
    }
}

impl UnitMap for DynWriter {
    fn unit_size(&self) -> u64 {
        self.block_size
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn lookup(&mut self, file: &ImageFile, unit: u64) -> Result<Option<u64>> {
        let Some(&e) = self.bat.get(unit as usize) else {
            return Ok(None);
        };
        if e == BAT_UNUSED {
            return Ok(None);
        }
        let start = e as u64 * SECTOR;
        if !self.full_bitmap.get(unit) {
            self.fill_bitmap(file, unit, start)?;
        }
        Ok(Some(start + self.bitmap_size))
    }

    fn allocate(&mut self, file: &ImageFile, unit: u64) -> Result<Alloc> {
        let (start, fresh) = match self.free.take() {
            Some(s) => (s, false),
            None => (self.data_end, true),
        };
        let sector = u32::try_from(start / SECTOR)
            .ok()
            .filter(|&s| s != BAT_UNUSED)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "VHD image {} would grow past the 2 TiB a VHD can address",
                    file.path().display()
                ))
            })?;
        file.write_all_at(start, &self.all_ones_bitmap())?;
        if fresh {
            self.data_end = start + self.bitmap_size + self.block_size;
            // Extend now: the next data sync then covers the length too, so a BAT entry
            // written after it never points past the end of the file.
            file.set_len(self.data_end)?;
        }
        self.bat[unit as usize] = sector;
        self.dirty.mark(unit * 4, SECTOR);
        self.full_bitmap.set(unit);
        Ok(Alloc {
            host: start + self.bitmap_size,
            fresh,
        })
    }

    fn deallocate(&mut self, _file: &ImageFile, unit: u64) -> Result<Option<u64>> {
        let Some(e) = self.bat.get_mut(unit as usize) else {
            return Ok(None);
        };
        if *e == BAT_UNUSED {
            return Ok(None);
        }
        let start = *e as u64 * SECTOR;
        *e = BAT_UNUSED;
        self.dirty.mark(unit * 4, SECTOR);
        self.free.release(start);
        Ok(Some(start + self.bitmap_size))
    }

    fn flush(&mut self, file: &ImageFile) -> Result<()> {
        if self.footer_at != self.data_end {
            file.write_all_at(self.data_end, &self.footer)?;
            self.footer_at = self.data_end;
        }
        self.dirty
            .write_back(file, self.bat_offset, SECTOR, &self.bat, u32::to_be_bytes)
    }

    fn durable(&mut self) {
        self.free.durable();
    }

    fn wants_sync(&self) -> bool {
        self.free.wants_sync()
    }
}

/// Creates a dynamic VHD with blocks of `options.block_size` (default 2 MiB).
pub(crate) fn create_dynamic(
    path: &Path,
    size: u64,
    options: &CreateOptions,
) -> Result<Box<dyn ImageWriter>> {
    let size = image_size(path, size)?;
    let block_size = options.block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
    if !power_of_two_in(block_size, BLOCK_SIZES) {
        return Err(Error::InvalidArgument(format!(
            "VHD block size {block_size} is not a power of two between 512 bytes and 256 MiB \
             (Windows and qemu use 2 MiB)"
        )));
    }
    let entries = size.div_ceil(block_size);
    let footer = Footer::new(size, DISK_DYNAMIC).encode();
    let header = DynHeader {
        table_offset: BAT_OFFSET,
        max_table_entries: entries as u32,
        block_size: block_size as u32,
    };
    let bat_len = round_up(entries * 4, SECTOR).unwrap_or(0);
    let data_end = BAT_OFFSET + bat_len;
    let file = ImageFile::create_new(path)?;
    file.write_all_at(0, &footer)?;
    file.write_all_at(DYN_HEADER_OFFSET, &header.encode())?;
    file.write_all_at(BAT_OFFSET, &vec![0xFF; bat_len as usize])?;
    file.write_all_at(data_end, &footer)?;
    file.sync()?;
    let bat = vec![BAT_UNUSED; entries as usize];
    let map = DynWriter::new(footer, size, &header, bat, data_end);
    Ok(Box::new(SparseWriter::new(file, map)))
}

/// Opens a VHD of the given kind for update.
pub(crate) fn open_for_update(
    path: &Path,
    size: u64,
    dynamic: bool,
) -> Result<Box<dyn ImageWriter>> {
    let expected = image_size(path, size)?;
    let o = open_checked(ImageFile::open_rw(path)?)?;
    let kind = |d: bool| if d { "dynamic" } else { "fixed" };
    if o.dynamic.is_some() != dynamic {
        return Err(Error::InvalidArgument(format!(
            "{} is a {} VHD, not a {} one",
            path.display(),
            kind(o.dynamic.is_some()),
            kind(dynamic)
        )));
    }
    check_virtual_size(path, o.size, expected)?;
    let Some(h) = o.dynamic.clone() else {
        if o.file_len != o.size + FOOTER_SIZE {
            return Err(o.file.corrupt(
                "VHD footer",
                format!(
                    "a fixed VHD of {} bytes should be {} bytes long, the file is {}",
                    o.size,
                    o.size + FOOTER_SIZE,
                    o.file_len
                ),
            ));
        }
        return Ok(Box::new(FixedWriter {
            file: o.file,
            size: o.size,
        }));
    };
    let entries = h.max_table_entries as u64;
    if entries > MAX_WRITER_BAT_ENTRIES {
        return Err(o.file.unsupported(format!(
            "its block allocation table has {entries} entries; volback updates VHDs of at \
             most {MAX_WRITER_BAT_ENTRIES}"
        )));
    }
    let bat = o.file.read_table(
        h.table_offset,
        entries,
        "VHD block allocation table",
        u32::from_be_bytes,
    )?;
    let bounds = BlockBounds::new(&o, &h);
    // Every block inside the file, clear of the headers and of every other block.
    let mut blocks: Vec<(u64, u64)> = Vec::new();
    let mut data_end = bounds.reserved.iter().map(|r| r.end).max().unwrap_or(0);
    data_end = round_up(data_end, SECTOR).unwrap_or(data_end);
    for (i, &e) in bat.iter().enumerate() {
        if e != BAT_UNUSED {
            let r = bounds.block_range(&o.file, i as u64, e)?;
            data_end = data_end.max(r.end);
            blocks.push((r.start, i as u64));
        }
    }
    o.file.check_disjoint(
        "VHD block allocation table",
        &mut blocks,
        bounds.bitmap_size + bounds.block_size,
    )?;
    let footer: [u8; 512] = {
        let mut f = [0u8; 512];
        o.file.read_exact_at(0, &mut f, "VHD footer copy")?;
        if Footer::parse(&f).is_ok() {
            f
        } else {
            // The copy at offset 0 is damaged (the footer at the end was used): repair it,
            // qemu reads that one first.
            let f = o.footer.encode();
            o.file.write_all_at(0, &f)?;
            f
        }
    };
    // Anything past the last block is an unreferenced leftover (or the old footer): cut it
    // and put the footer right after the last block.
    o.file.set_len(data_end)?;
    o.file.write_all_at(data_end, &footer)?;
    o.file.sync()?;
    let map = DynWriter::new(footer, o.size, &h, bat, data_end);
    Ok(Box::new(SparseWriter::new(o.file, map)))
}
