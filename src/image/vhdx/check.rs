//! Validation of a VHDX against its file: the current header, an empty log, the regions,
//! the metadata items, and BAT entries that point inside the file and clear of the image's own
//! structures.

use super::bat::{Geometry, Payload, decode_payload};
use super::header::{
    FILE_SIGNATURE, HEADER_OFFSETS, HEADER_SECTION, HEADER_SIZE, Header, MIB, TABLE_SIZE,
};
use super::metadata::{
    FILE_PARAMETERS_GUID, KNOWN_ITEMS, LOGICAL_SECTOR_SIZE_GUID, MAX_BLOCK, MAX_SIZE,
    META_IS_REQUIRED, META_IS_USER, MIN_BLOCK, PAGE83_GUID, PARAM_HAS_PARENT,
    PARAM_LEAVE_ALLOCATED, PARENT_LOCATOR_GUID, PHYSICAL_SECTOR_SIZE_GUID, VIRTUAL_DISK_SIZE_GUID,
    parse_metadata_table,
};
use super::region::{BAT_GUID, METADATA_GUID, REGION_OFFSETS, parse_region_table};
use crate::bytes::{le_u32, le_u64};
use crate::error::Result;
use crate::image::error::ParseError;
use crate::image::file::{ImageFile, clash, power_of_two_in};
use crate::probe::crc32::crc32c_skipping;
use crate::probe::guid::Guid;
use std::ops::Range;

const LOG_ENTRY_SIGNATURE: &[u8; 4] = b"loge";

/// A VHDX opened and checked.
pub(super) struct Parsed {
    /// Slot (0 or 1) of the current header.
    pub slot: usize,
    pub header: Header,
    pub bat_offset: u64,
    pub leave_allocated: bool,
    pub bounds: Bounds,
}

/// Where the payload blocks of a VHDX may be: the checks every BAT entry passes.
pub(super) struct Bounds {
    pub file_len: u64,
    pub geo: Geometry,
    /// File ranges that belong to the format's own structures.
    pub reserved: Vec<Range<u64>>,
}

impl Bounds {
    /// Decodes and checks the BAT entry of payload block `block`: `Some(offset)` when the
    /// block is present, `None` when it reads as zeros.
    pub fn payload(&self, file: &ImageFile, block: u64, entry: u64) -> Result<Option<u64>> {
        let what = || format!("VHDX BAT entry of block {block}");
        match decode_payload(entry) {
            Payload::Zero => Ok(None),
            Payload::Present(off) => {
                // The last block may be short in files written by old qemu versions: only its
                // virtual part has to be in the file.
                let bs = self.geo.block_size;
                let vlen = bs.min(self.geo.size - block * bs);
                file.check_placement(
                    what,
                    "block",
                    off,
                    (vlen, bs),
                    self.file_len,
                    &self.reserved,
                )?;
                Ok(Some(off))
            }
            Payload::Partial => Err(file.corrupt(
                what(),
                "state \"partially present\" is only valid in differencing disks",
            )),
            Payload::Reserved(s) => Err(file.corrupt(what(), format!("reserved state {s}"))),
        }
    }
}

fn read_header_slot(file: &ImageFile, slot: usize) -> Result<Result<Header, ParseError>> {
    let mut b = vec![0u8; HEADER_SIZE];
    file.read_exact_at(HEADER_OFFSETS[slot], &mut b, "VHDX header")?;
    Ok(Header::parse(&b))
}

/// The current header and its slot: the valid one with the higher sequence number.
fn current_header(file: &ImageFile) -> Result<(usize, Header)> {
    let mut sig = [0u8; 8];
    file.read_exact_at(0, &mut sig, "VHDX file type identifier")?;
    if &sig != FILE_SIGNATURE {
        return Err(file.corrupt("VHDX file type identifier", "no \"vhdxfile\" signature"));
    }
    let h = [read_header_slot(file, 0)?, read_header_slot(file, 1)?];
    let (slot, header) = match (&h[0], &h[1]) {
        (Ok(a), Ok(b)) if a.seq > b.seq => (0, a.clone()),
        (Ok(a), Ok(b)) if b.seq > a.seq => (1, b.clone()),
        (Ok(a), Ok(b)) if a == b => (0, a.clone()),
        (Ok(_), Ok(_)) => {
            return Err(file.corrupt(
                "VHDX headers",
                "both headers are valid, differ, and have the same sequence number",
            ));
        }
        (Ok(a), Err(_)) => (0, a.clone()),
        (Err(_), Ok(b)) => (1, b.clone()),
        (Err(a), Err(b)) => {
            return Err(file.corrupt(
                "VHDX headers",
                format!("neither header is valid (header 1: {a}; header 2: {b})"),
            ));
        }
    };
    Ok((slot, header))
}

/// Checks the log's place; refuses a log that holds updates never applied.
fn check_log(file: &ImageFile, header: &Header, file_len: u64) -> Result<()> {
    let log = header.log();
    if header.log_length > 0
        && (header.log_offset < HEADER_SECTION
            || !header.log_offset.is_multiple_of(MIB)
            || !(header.log_length as u64).is_multiple_of(MIB)
            || log.end > file_len)
    {
        return Err(file.corrupt(
            "VHDX header",
            format!(
                "log of {} bytes at offset {} is not a 1 MiB-aligned range inside the file",
                header.log_length, header.log_offset
            ),
        ));
    }
    if header.log_guid != [0; 16] {
        if header.log_version != 0 {
            return Err(file.unsupported(format!(
                "its log has format version {}, which volback does not know",
                header.log_version
            )));
        }
        if log_has_entries(file, header, &log)? {
            return Err(file.unsupported(
                "its log holds updates that were never applied (the program writing it \
                 stopped); attach it once in Windows or run `qemu-img check -r all` on it to \
                 replay the log",
            ));
        }
    }
    Ok(())
}

/// The BAT and metadata regions from the first valid region table, checked to lie inside the
/// file and apart from each other and the header section and log; with all the file ranges
/// the image's structures take.
fn regions(file: &ImageFile, header: &Header, file_len: u64) -> Result<Regions> {
    // Region table: the first valid copy.
    let mut regions = None;
    let mut why = Vec::new();
    for off in REGION_OFFSETS {
        let mut b = vec![0u8; TABLE_SIZE];
        file.read_exact_at(off, &mut b, "VHDX region table")?;
        match parse_region_table(&b) {
            Ok(r) => {
                regions = Some(r);
                break;
            }
            Err(e) => why.push(e.to_string()),
        }
    }
    let Some(regions) = regions else {
        return Err(file.corrupt("VHDX region tables", why.join("; ")));
    };
    let mut reserved: Vec<Range<u64>> = Vec::new();
    reserved.push(0..HEADER_SECTION);
    if header.log_length > 0 {
        reserved.push(header.log());
    }
    let (mut bat, mut meta) = (None, None);
    for r in &regions {
        let range = r.range();
        if range.end > file_len {
            return Err(file.corrupt(
                "VHDX region table",
                format!(
                    "region {} ({} bytes at {}) extends past the end of the file ({file_len} \
                     bytes)",
                    Guid(r.guid),
                    r.length,
                    r.offset
                ),
            ));
        }
        if let Some(o) = clash(&reserved, &range) {
            return Err(file.corrupt(
                "VHDX region table",
                format!(
                    "region {} at {}..{} overlaps another structure at {}..{}",
                    Guid(r.guid),
                    range.start,
                    range.end,
                    o.start,
                    o.end
                ),
            ));
        }
        reserved.push(range.clone());
        if r.guid == BAT_GUID {
            bat = Some(range);
        } else if r.guid == METADATA_GUID {
            meta = Some(range);
        } else if r.required {
            return Err(file.unsupported(format!(
                "it has a required region {} that volback does not know",
                Guid(r.guid)
            )));
        }
    }
    let (Some(bat), Some(meta)) = (bat, meta) else {
        return Err(file.corrupt(
            "VHDX region table",
            "the BAT or the metadata region is missing",
        ));
    };
    Ok(Regions {
        bat,
        meta,
        reserved,
    })
}

/// The regions volback reads, and every file range the image's structures take.
struct Regions {
    bat: Range<u64>,
    meta: Range<u64>,
    reserved: Vec<Range<u64>>,
}

/// Opens a VHDX's headers, regions and metadata and checks them against the file.
pub(super) fn parse(file: &ImageFile) -> Result<Parsed> {
    let file_len = file.len()?;
    let (slot, header) = current_header(file)?;
    check_log(file, &header, file_len)?;
    let Regions {
        bat,
        meta,
        reserved,
    } = regions(file, &header, file_len)?;
    // Metadata.
    let mut table = vec![0u8; TABLE_SIZE];
    let meta_len = meta.end - meta.start;
    if meta_len < TABLE_SIZE as u64 {
        return Err(file.corrupt(
            "VHDX metadata region",
            format!("{meta_len} bytes, too small for its table"),
        ));
    }
    file.read_exact_at(meta.start, &mut table, "VHDX metadata table")?;
    let entries = parse_metadata_table(&table, meta_len)
        .map_err(|e| file.rejected("VHDX metadata table", e))?;
    let item = |guid: &[u8; 16], name: &str, len: usize| -> Result<Vec<u8>> {
        let Some(e) = entries
            .iter()
            .find(|e| &e.guid == guid && e.flags & META_IS_USER == 0)
        else {
            return Err(file.corrupt(
                "VHDX metadata table",
                format!("the required {name} item is missing"),
            ));
        };
        if (e.length as usize) < len {
            return Err(file.corrupt(
                format!("VHDX {name} metadata item"),
                format!("{} bytes, expected {len}", e.length),
            ));
        }
        let mut b = vec![0u8; len];
        file.read_exact_at(meta.start + e.offset as u64, &mut b, "VHDX metadata item")?;
        Ok(b)
    };
    let params = item(&FILE_PARAMETERS_GUID, "file parameters", 8)?;
    let size = le_u64(&item(&VIRTUAL_DISK_SIZE_GUID, "virtual disk size", 8)?, 0);
    let logical = le_u32(
        &item(&LOGICAL_SECTOR_SIZE_GUID, "logical sector size", 4)?,
        0,
    );
    let physical = le_u32(
        &item(&PHYSICAL_SECTOR_SIZE_GUID, "physical sector size", 4)?,
        0,
    );
    item(&PAGE83_GUID, "virtual disk id", 16)?;
    let block_size = le_u32(&params, 0) as u64;
    let flags = le_u32(&params, 4);
    if flags & PARAM_HAS_PARENT != 0 || entries.iter().any(|e| e.guid == PARENT_LOCATOR_GUID) {
        return Err(file.unsupported(
            "it is a differencing VHDX (its data depends on a parent image); merge it into its \
             parent first",
        ));
    }
    if let Some(e) = entries
        .iter()
        .find(|e| e.flags & META_IS_REQUIRED != 0 && !KNOWN_ITEMS.contains(&e.guid))
    {
        return Err(file.unsupported(format!(
            "it has a required metadata item {} that volback does not know",
            Guid(e.guid)
        )));
    }
    if !power_of_two_in(block_size, MIN_BLOCK..=MAX_BLOCK) {
        return Err(file.corrupt(
            "VHDX file parameters",
            format!("block size {block_size} is not a power of two from 1 MiB to 256 MiB"),
        ));
    }
    if logical != 512 && logical != 4096 {
        return Err(file.corrupt(
            "VHDX logical sector size",
            format!("{logical} (must be 512 or 4096)"),
        ));
    }
    if physical != 512 && physical != 4096 {
        return Err(file.corrupt(
            "VHDX physical sector size",
            format!("{physical} (must be 512 or 4096)"),
        ));
    }
    if size > MAX_SIZE || !size.is_multiple_of(logical as u64) {
        return Err(file.corrupt(
            "VHDX virtual disk size",
            format!("{size} is larger than 64 TiB or not a multiple of the {logical}-byte sector"),
        ));
    }
    let geo = Geometry::new(size, block_size, logical as u64);
    if geo.bat_entries * 8 > bat.end - bat.start {
        return Err(file.corrupt(
            "VHDX region table",
            format!(
                "the BAT region ({} bytes) is too small for the {} entries a disk of {size} \
                 bytes needs",
                bat.end - bat.start,
                geo.bat_entries
            ),
        ));
    }
    Ok(Parsed {
        slot,
        header,
        bat_offset: bat.start,
        leave_allocated: flags & PARAM_LEAVE_ALLOCATED != 0,
        bounds: Bounds {
            file_len,
            geo,
            reserved,
        },
    })
}

/// True when the log region holds at least one valid entry of the current log (same log GUID,
/// correct CRC-32C): the image then needs a log replay before it can be read.
fn log_has_entries(file: &ImageFile, header: &Header, log: &Range<u64>) -> Result<bool> {
    let len = log.end - log.start;
    let mut head = [0u8; 64];
    let mut pos = 0;
    while pos < len {
        file.read_exact_at(log.start + pos, &mut head, "VHDX log")?;
        let entry_len = le_u32(&head, 8) as u64;
        if &head[0..4] == LOG_ENTRY_SIGNATURE
            && head[32..48] == header.log_guid
            && entry_len > 0
            && entry_len.is_multiple_of(4096)
            && entry_len <= len
        {
            // The entry may wrap around the end of the circular log.
            let mut entry = vec![0u8; entry_len as usize];
            let first = entry_len.min(len - pos) as usize;
            file.read_exact_at(log.start + pos, &mut entry[..first], "VHDX log")?;
            file.read_exact_at(log.start, &mut entry[first..], "VHDX log")?;
            if crc32c_skipping(&entry, 4) == le_u32(&head, 4) {
                return Ok(true);
            }
        }
        pos += 4096;
    }
    Ok(false)
}
