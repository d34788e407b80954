//! Writing a VHDX: creating an image, updating one in place (header update first), allocating
//! and freeing blocks.

use super::bat::{
    ENTRY_SIZE, Geometry, Payload, ZERO_ENTRY, bitmap_present, decode_payload, present_entry,
};
use super::check::parse;
use super::header::{HEADER_OFFSETS, HEADER_SECTION, Header, MIB, file_identifier};
use super::metadata::{MAX_BLOCK, MAX_SIZE, MIN_BLOCK, encode_metadata};
use super::region::{BAT_GUID, METADATA_GUID, REGION_OFFSETS, Region, encode_region_table};
use crate::error::{Error, Result};
use crate::image::file::{
    DirtyPages, ImageFile, check_virtual_size, power_of_two_in, round_up, whole_sectors,
};
use crate::image::sparse::{Alloc, FreeList, SparseWriter, UnitMap};
use crate::image::{CreateOptions, ImageWriter};
use crate::probe::guid::Guid;
use std::path::Path;

/// The layout volback writes: log, metadata region, BAT, then the blocks.
const LOG_OFFSET: u64 = MIB;
const LOG_LENGTH: u64 = MIB;
const METADATA_OFFSET: u64 = 2 * MIB;
const METADATA_LENGTH: u64 = MIB;
const BAT_OFFSET: u64 = 3 * MIB;
/// Most BAT entries volback holds in memory to update an image (128 MiB).
const MAX_WRITER_BAT_ENTRIES: u64 = 1 << 24;
/// The BAT is written back in pages of this size.
const BAT_PAGE: u64 = 4096;

/// Virtual size of a VHDX for a volume of `size` bytes: whole 512-byte logical sectors.
pub(crate) fn image_size(path: &Path, size: u64) -> Result<u64> {
    whole_sectors(size, MAX_SIZE).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "cannot make {} a VHDX of {size} bytes: VHDX images hold at most 64 TiB",
            path.display()
        ))
    })
}

/// The default block size: 2 MiB (sparse at a fine grain, a BAT of 8 bytes per 2 MiB), larger
/// for disks above 2 TiB so that the BAT stays near a million entries.
fn default_block_size(size: u64) -> u64 {
    (size >> 20).next_power_of_two().clamp(2 * MIB, 64 * MIB)
}

struct VhdxWriter {
    geo: Geometry,
    bat_offset: u64,
    bat: Vec<u64>,
    dirty: DirtyPages,
    /// Where the next block goes (1 MiB-aligned).
    data_end: u64,
    leave_allocated: bool,
    free: FreeList,
}

impl UnitMap for VhdxWriter {
    fn unit_size(&self) -> u64 {
        self.geo.block_size
    }

    fn size(&self) -> u64 {
        self.geo.size
    }

    fn lookup(&mut self, _file: &ImageFile, unit: u64) -> Result<Option<u64>> {
        match decode_payload(self.bat[self.geo.index(unit) as usize]) {
            Payload::Present(host) => Ok(Some(host)),
            _ => Ok(None),
        }
    }

    fn allocate(&mut self, file: &ImageFile, unit: u64) -> Result<Alloc> {
        let (host, fresh) = match self.free.take() {
            Some(h) => (h, false),
            None => {
                let h = self.data_end;
                self.data_end += self.geo.block_size;
                // Extend now so that the data sync before the BAT write covers the length.
                file.set_len(self.data_end)?;
                (h, true)
            }
        };
        let i = self.geo.index(unit);
        self.bat[i as usize] = present_entry(host);
        self.dirty.mark(i * ENTRY_SIZE, BAT_PAGE);
        Ok(Alloc { host, fresh })
    }

    fn deallocate(&mut self, file: &ImageFile, unit: u64) -> Result<Option<u64>> {
        let i = self.geo.index(unit);
        let Payload::Present(host) = decode_payload(self.bat[i as usize]) else {
            return Ok(None);
        };
        if self.leave_allocated {
            // A fixed VHDX keeps every block: zero it in place.
            file.zero(host, self.geo.block_size)?;
            return Ok(None);
        }
        // "Zero" state: the block reads as zeros (its offset field must be 0).
        self.bat[i as usize] = ZERO_ENTRY;
        self.dirty.mark(i * ENTRY_SIZE, BAT_PAGE);
        self.free.release(host);
        Ok(Some(host))
    }

    fn flush(&mut self, file: &ImageFile) -> Result<()> {
        self.dirty
            .write_back(file, self.bat_offset, BAT_PAGE, &self.bat, u64::to_le_bytes)
    }

    fn durable(&mut self) {
        self.free.durable();
    }

    fn wants_sync(&self) -> bool {
        self.free.wants_sync()
    }
}

/// Creates a dynamic VHDX.
pub(crate) fn create(
    path: &Path,
    size: u64,
    options: &CreateOptions,
) -> Result<Box<dyn ImageWriter>> {
    let size = image_size(path, size)?;
    let block_size = options
        .block_size
        .unwrap_or_else(|| default_block_size(size));
    if !power_of_two_in(block_size, MIN_BLOCK..=MAX_BLOCK) {
        return Err(Error::InvalidArgument(format!(
            "VHDX block size {block_size} is not a power of two from 1 MiB to 256 MiB"
        )));
    }
    let geo = Geometry::new(size, block_size, 512);
    let bat_len = round_up((geo.bat_entries * ENTRY_SIZE).max(1), MIB).unwrap_or(MIB);
    let data_end = BAT_OFFSET + bat_len;
    let file = ImageFile::create_new(path)?;

    let id = file_identifier(concat!("volback ", env!("CARGO_PKG_VERSION")));
    file.write_all_at(0, &id)?;

    let header = Header {
        seq: 1,
        file_write: Guid::random().0,
        data_write: Guid::random().0,
        log_guid: [0; 16],
        log_version: 0,
        version: 1,
        log_length: LOG_LENGTH as u32,
        log_offset: LOG_OFFSET,
    };
    file.write_all_at(HEADER_OFFSETS[0], &header.encode())?;
    let second = Header { seq: 2, ..header };
    file.write_all_at(HEADER_OFFSETS[1], &second.encode())?;

    let regions = [
        Region {
            guid: BAT_GUID,
            offset: BAT_OFFSET,
            length: bat_len as u32,
            required: true,
        },
        Region {
            guid: METADATA_GUID,
            offset: METADATA_OFFSET,
            length: METADATA_LENGTH as u32,
            required: true,
        },
    ];
    let rt = encode_region_table(&regions);
    for off in REGION_OFFSETS {
        file.write_all_at(off, &rt)?;
    }

    let (table, data) = encode_metadata(block_size, size, Guid::random().0);
    file.write_all_at(METADATA_OFFSET, &table)?;
    file.write_all_at(METADATA_OFFSET + table.len() as u64, &data)?;

    // BAT: every payload block in the "zero" state (reads as zeros, as qemu does by
    // default); sector bitmap entries "not present".
    let mut bat = vec![0u64; geo.bat_entries as usize];
    for b in 0..geo.payload_blocks {
        bat[geo.index(b) as usize] = ZERO_ENTRY;
    }
    let mut dirty = DirtyPages::default();
    for i in 0..geo.bat_entries {
        if i % (BAT_PAGE / ENTRY_SIZE) == 0 {
            dirty.mark(i * ENTRY_SIZE, BAT_PAGE);
        }
    }
    file.set_len(data_end)?;
    let mut map = VhdxWriter {
        geo,
        bat_offset: BAT_OFFSET,
        bat,
        dirty,
        data_end,
        leave_allocated: false,
        free: FreeList::default(),
    };
    map.flush(&file)?;
    file.sync()?;
    Ok(Box::new(SparseWriter::new(file, map)))
}

/// Opens a VHDX for update.
pub(crate) fn open_for_update(path: &Path, size: u64) -> Result<Box<dyn ImageWriter>> {
    let expected = image_size(path, size)?;
    let file = ImageFile::open_rw(path)?;
    let p = parse(&file)?;
    let geo = p.bounds.geo;
    check_virtual_size(path, geo.size, expected)?;
    if geo.bat_entries > MAX_WRITER_BAT_ENTRIES {
        return Err(file.unsupported(format!(
            "its BAT has {} entries; volback updates VHDX images of at most \
             {MAX_WRITER_BAT_ENTRIES} (use larger blocks)",
            geo.bat_entries
        )));
    }
    let bat = file.read_table(
        p.bat_offset,
        geo.bat_entries,
        "VHDX BAT",
        u64::from_le_bytes,
    )?;
    let mut data_end = p
        .bounds
        .reserved
        .iter()
        .map(|r| r.end)
        .max()
        .unwrap_or(HEADER_SECTION);
    let mut blocks = Vec::new();
    for b in 0..geo.payload_blocks {
        let e = bat[geo.index(b) as usize];
        if let Some(off) = p.bounds.payload(&file, b, e)? {
            data_end = data_end.max(off + geo.block_size);
            blocks.push((off, b));
        }
    }
    for i in geo.bitmap_indexes() {
        if let Some(&e) = bat.get(i as usize)
            && bitmap_present(e)
        {
            return Err(file.corrupt(
                format!("VHDX BAT entry {i}"),
                "a sector bitmap block is present in a non-differencing disk",
            ));
        }
    }
    file.check_disjoint("VHDX BAT", &mut blocks, geo.block_size)?;
    let data_end = round_up(data_end, MIB).unwrap_or(data_end);
    // Anything past the last structure is an unreferenced leftover of an interrupted run.
    file.set_len(data_end)?;
    // Header update before anything else changes (MS-VHDX 2.2.2.1), twice so that both
    // copies are current. The log is empty (checked when parsing), so its GUID is cleared.
    let mut header = p.header.clone();
    header.file_write = Guid::random().0;
    header.data_write = Guid::random().0;
    header.log_guid = [0; 16];
    let mut slot = p.slot;
    for _ in 0..2 {
        header.seq = header.seq.wrapping_add(1);
        slot = 1 - slot;
        file.write_all_at(HEADER_OFFSETS[slot], &header.encode())?;
        file.sync()?;
    }
    let map = VhdxWriter {
        geo,
        bat_offset: p.bat_offset,
        bat,
        dirty: DirtyPages::default(),
        data_end,
        leave_allocated: p.leave_allocated,
        free: FreeList::default(),
    };
    Ok(Box::new(SparseWriter::new(file, map)))
}
